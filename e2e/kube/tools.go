//go:build tools

// Package tools names the programs this module builds, so that go.mod and go.sum
// keep every module they need. It is never compiled (see the build tag); install.sh
// builds each program by its import path. etcd is built from etcd/main.go.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
