# shellcheck shell=bash disable=SC2154  # $pki is set by the script that sources this file
# Certificate helpers of up.sh and node-credentials.sh (sourced, not run). Every key
# is ECDSA P-256 (quick to make; Kubernetes, kubectl and rustls all take it), every
# certificate is signed by the harness's CA in $pki (ca.crt, ca.key).

# kube_cert NAME SUBJECT USAGE [SAN [CA]]: makes $pki/NAME.key and $pki/NAME.crt,
# signed by $pki/CA.crt (default: ca). USAGE is "client", "server" or "both"; SAN is
# an openssl subjectAltName value ("DNS:localhost,IP:127.0.0.1") or empty.
kube_cert() {
    local name=$1 subject=$2 usage=$3 san=${4:-} ca=${5:-ca} ext
    case $usage in
        client) ext="clientAuth" ;;
        server) ext="serverAuth" ;;
        both) ext="serverAuth,clientAuth" ;;
        *) echo "kube_cert: bad usage $usage" >&2; return 1 ;;
    esac
    openssl ecparam -name prime256v1 -genkey -noout -out "$pki/$name.key" 2>/dev/null
    chmod 600 "$pki/$name.key"
    {
        echo "basicConstraints = critical, CA:FALSE"
        echo "keyUsage = critical, digitalSignature, keyEncipherment"
        echo "extendedKeyUsage = $ext"
        [ -z "$san" ] || echo "subjectAltName = $san"
    } >"$pki/$name.ext"
    openssl req -new -key "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr" 2>/dev/null
    openssl x509 -req -in "$pki/$name.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" -CAcreateserial \
        -days 3650 -sha256 -extfile "$pki/$name.ext" -out "$pki/$name.crt" 2>/dev/null
    rm -f "$pki/$name.csr" "$pki/$name.ext"
}

# kube_ca [NAME]: makes a CA, $pki/NAME.key and $pki/NAME.crt (default NAME: ca).
kube_ca() {
    local name=${1:-ca}
    openssl ecparam -name prime256v1 -genkey -noout -out "$pki/$name.key" 2>/dev/null
    chmod 600 "$pki/$name.key"
    openssl req -x509 -new -key "$pki/$name.key" -subj "/CN=multisite-kube-$name" -days 3650 -sha256 \
        -addext "basicConstraints = critical, CA:TRUE" \
        -addext "keyUsage = critical, keyCertSign, cRLSign, digitalSignature" \
        -out "$pki/$name.crt" 2>/dev/null
}

# kube_kubeconfig FILE URL CERT KEY USER: a kubeconfig for URL that trusts the CA and
# authenticates with the client certificate CERT/KEY; the data is embedded.
kube_kubeconfig() {
    local file=$1 url=$2 cert=$3 key=$4 user=$5
    cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: multisite-kube
  cluster:
    server: $url
    certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
- name: $user
  user:
    client-certificate-data: $(base64 -w0 <"$cert")
    client-key-data: $(base64 -w0 <"$key")
contexts:
- name: $user@multisite-kube
  context:
    cluster: multisite-kube
    user: $user
current-context: $user@multisite-kube
EOF
    chmod 600 "$file"
}

# kube_node_credentials STATE NAME [IP]: STATE/nodes/NAME/{kubeconfig,client.crt,
# client.key,serving.crt,serving.key} for the node agent of NAME: its API client
# identity (system:node:NAME in group system:nodes, what the Node authorizer and
# NodeRestriction know) and its serving certificate for IP (default 127.0.0.1) and NAME.
kube_node_credentials() {
    local state=$1 name=$2 ip=${3:-127.0.0.1} dir
    if ! [[ "$name" =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]]; then
        echo "kube: \"$name\" is not a valid node name (lower case letters, digits, '-' and '.')" >&2
        return 1
    fi
    if ! [[ "$ip" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ || "$ip" =~ ^[0-9a-fA-F:]+$ ]]; then
        echo "kube: \"$ip\" is not an IP address" >&2
        return 1
    fi
    dir=$state/nodes/$name
    mkdir -p "$dir"
    kube_cert "node-$name-client" "/O=system:nodes/CN=system:node:$name" client
    kube_cert "node-$name-serving" "/O=system:nodes/CN=system:node:$name" server "DNS:$name,IP:$ip"
    mv "$pki/node-$name-client.crt" "$dir/client.crt"
    mv "$pki/node-$name-client.key" "$dir/client.key"
    mv "$pki/node-$name-serving.crt" "$dir/serving.crt"
    mv "$pki/node-$name-serving.key" "$dir/serving.key"
    kube_kubeconfig "$dir/kubeconfig" "$(cat "$state/url")" "$dir/client.crt" "$dir/client.key" "system:node:$name"
}
