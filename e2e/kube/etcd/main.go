// Command etcd is the etcd server, built from etcd's server module at the version
// k8s.io/kubernetes itself requires (see go.mod), so one module resolves both.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
