#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Mints the credentials of one more node agent for a control plane that up.sh made in
# STATE_DIR, with the CA kept in STATE_DIR/pki:
#   STATE_DIR/nodes/NAME/kubeconfig     API client as system:node:NAME (group system:nodes)
#   STATE_DIR/nodes/NAME/client.crt|key the same identity as files
#   STATE_DIR/nodes/NAME/serving.crt|key the node agent's HTTPS serving certificate, for IP
#                                      (default 127.0.0.1) and NAME; the API server
#                                      trusts it for logs (--kubelet-certificate-authority)
#
#   e2e/kube/node-credentials.sh STATE_DIR NAME [IP]
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 STATE_DIR NAME [IP]" >&2
    exit 1
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=pki.sh
. "$here/pki.sh"
state=$(cd "$1" && pwd)
pki=$state/pki
if [ ! -f "$pki/ca.key" ] || [ ! -f "$state/url" ]; then
    echo "node-credentials: $state is not a state directory of e2e/kube/up.sh (no pki/ca.key or url)" >&2
    exit 1
fi
kube_node_credentials "$state" "$2" "${3:-127.0.0.1}"
echo "$state/nodes/$2/kubeconfig"
