package main

import (
	_ "k8s.io/apiextensions-apiserver/pkg/cmd/server"
	_ "k8s.io/apiserver/pkg/endpoints/discovery/aggregated"
	_ "k8s.io/client-go/informers"
	_ "k8s.io/client-go/kubernetes/fake"
)

func main() {}
