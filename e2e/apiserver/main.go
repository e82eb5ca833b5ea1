// Command multisite-apiserver serves CustomResourceDefinitions and custom resources
// with the code kube-apiserver itself uses for them (k8s.io/apiextensions-apiserver),
// stored in etcd, for the project's tests. It is built by install.sh from Debian's
// packaged Kubernetes sources.
//
// Compared with the standalone apiextensions-apiserver it
//   - serves plain HTTP on one loopback address: no certificates to hand to clients;
//   - lets every request in: requests without credentials act as system:anonymous,
//     requests with a bearer token (any token) as a member of system:masters, and the
//     authorizer allows everything;
//   - runs no admission plugins, no priority-and-fairness and no core informers, and
//     needs no kube-apiserver to delegate authentication or authorization to;
//   - answers /api and /api/v1 (the core version, with no resources: clients such as
//     kubectl expect it to exist, for "kind: List" files for example) and /apis (the
//     apiextensions.k8s.io group and the groups of the Established CRDs), in the legacy
//     and the aggregated discovery formats, which the standalone server leaves to the
//     kube-aggregator;
//   - publishes OpenAPI v2 and v3, with the CRDs' schemas merged in.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strings"
	"time"

	apidiscoveryv2 "k8s.io/api/apidiscovery/v2"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/apiserver"
	listers "k8s.io/apiextensions-apiserver/pkg/client/listers/apiextensions/v1"
	"k8s.io/apiextensions-apiserver/pkg/cmd/server/options"
	generatedopenapi "k8s.io/apiextensions-apiserver/pkg/generated/openapi"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utilnet "k8s.io/apimachinery/pkg/util/net"
	"k8s.io/apimachinery/pkg/version"
	"k8s.io/apiserver/pkg/admission"
	"k8s.io/apiserver/pkg/authentication/authenticator"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizerfactory"
	"k8s.io/apiserver/pkg/endpoints/discovery"
	discoveryaggregated "k8s.io/apiserver/pkg/endpoints/discovery/aggregated"
	"k8s.io/apiserver/pkg/endpoints/handlers/negotiation"
	"k8s.io/apiserver/pkg/endpoints/handlers/responsewriters"
	openapinamer "k8s.io/apiserver/pkg/endpoints/openapi"
	genericapiserver "k8s.io/apiserver/pkg/server"
	"k8s.io/apiserver/pkg/util/openapi"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/klog/v2"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address for the plain HTTP API (host:port)")
	etcdServers := flag.String("etcd-servers", "http://127.0.0.1:2379", "comma-separated etcd client URLs")
	etcdPrefix := flag.String("etcd-prefix", "/registry", "key prefix of everything stored in etcd")
	klog.InitFlags(flag.CommandLine)
	flag.Parse()

	if err := run(genericapiserver.SetupSignalContext(), *listen, strings.Split(*etcdServers, ","), *etcdPrefix); err != nil {
		klog.ErrorS(err, "multisite-apiserver failed")
		os.Exit(1)
	}
}

func run(ctx context.Context, listen string, etcdServers []string, etcdPrefix string) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	addr := ln.Addr().(*net.TCPAddr)

	o := options.NewCustomResourceDefinitionsServerOptions(os.Stdout, os.Stderr)
	o.RecommendedOptions.Etcd.StorageConfig.Transport.ServerList = etcdServers
	o.RecommendedOptions.Etcd.StorageConfig.Prefix = etcdPrefix
	if err := o.ServerRunOptions.ComponentGlobalsRegistry.Set(); err != nil {
		return err
	}

	config := genericapiserver.NewRecommendedConfig(apiserver.Codecs)
	if err := o.ServerRunOptions.ApplyTo(&config.Config); err != nil {
		return err
	}
	if err := o.RecommendedOptions.Etcd.ApplyTo(&config.Config); err != nil {
		return err
	}
	if err := o.APIEnablement.ApplyTo(&config.Config, apiserver.DefaultAPIResourceConfigSource(), apiserver.Scheme); err != nil {
		return err
	}
	config.PublicAddress = addr.IP
	config.ExternalAddress = addr.String()
	config.LoopbackClientConfig = &rest.Config{Host: "http://" + addr.String(), QPS: 50, Burst: 100}
	config.Authentication.Authenticator = authenticator.RequestFunc(authenticate)
	config.Authorization.Authorizer = authorizerfactory.NewAlwaysAllowAuthorizer()
	config.AdmissionControl = admission.NewChainHandler()
	config.FlowControl = nil
	config.SharedInformerFactory = nil // no core API: nothing to watch, nothing to wait for

	definitions := openapi.GetOpenAPIDefinitionsWithoutDisabledFeatures(generatedopenapi.GetOpenAPIDefinitions)
	namer := openapinamer.NewDefinitionNamer(apiserver.Scheme, scheme.Scheme)
	config.OpenAPIConfig = genericapiserver.DefaultOpenAPIConfig(definitions, namer)
	config.OpenAPIConfig.Info.Title = "multisite-apiserver"
	config.OpenAPIV3Config = genericapiserver.DefaultOpenAPIV3Config(definitions, namer)
	config.OpenAPIV3Config.Info.Title = "multisite-apiserver"

	// /api and /apis are answered inside the handler chain (after authentication and
	// authorization), before the request reaches the CRD handler, which has none.
	routes := &discoveryRoutes{}
	config.BuildHandlerChainFunc = func(apiHandler http.Handler, c *genericapiserver.Config) http.Handler {
		return genericapiserver.DefaultBuildHandlerChain(routes.wrap(apiHandler), c)
	}

	server, err := (&apiserver.Config{
		GenericConfig: config,
		ExtraConfig: apiserver.ExtraConfig{
			CRDRESTOptionsGetter: options.NewCRDRESTOptionsGetter(*o.RecommendedOptions.Etcd, config.ResourceTransformers, config.StorageObjectCountTracker),
			ServiceResolver:      noServices{},
		},
	}).Complete().New(genericapiserver.NewEmptyDelegate())
	if err != nil {
		return err
	}
	generic := server.GenericAPIServer
	routes.crds = server.Informers.Apiextensions().V1().CustomResourceDefinitions().Lister()
	routes.builtin = generic.DiscoveryGroupManager
	routes.addresses = discovery.DefaultAddresses{DefaultAddress: addr.String()}
	routes.apis = discoveryaggregated.WrapAggregatedDiscoveryToHandler(http.HandlerFunc(routes.serveAPIs), generic.AggregatedDiscoveryGroupManager, nil)
	routes.api = discoveryaggregated.WrapAggregatedDiscoveryToHandler(http.HandlerFunc(routes.serveAPI), generic.AggregatedLegacyDiscoveryGroupManager, nil)
	generic.AggregatedLegacyDiscoveryGroupManager.AddGroupVersion("", apidiscoveryv2.APIVersionDiscovery{
		Version: "v1", Freshness: apidiscoveryv2.DiscoveryFreshnessCurrent, Resources: []apidiscoveryv2.APIResourceDiscovery{},
	})

	// The generic server's own run loop starts the controllers (post-start hooks) and
	// drives /readyz; it serves nothing itself since no secure serving is configured.
	prepared := generic.PrepareRun()
	failed := make(chan error, 1)
	go func() { failed <- prepared.RunWithContext(ctx) }()

	httpServer := &http.Server{Handler: generic.Handler, MaxHeaderBytes: 1 << 20, ReadHeaderTimeout: 32 * time.Second, IdleTimeout: 90 * time.Second}
	go func() { failed <- httpServer.Serve(ln) }()
	klog.InfoS("serving", "url", "http://"+addr.String(), "etcd", etcdServers, "version", generic.EffectiveVersion.Info().GitVersion)

	select {
	case err := <-failed:
		return err
	case <-ctx.Done():
	}
	// Stopping is quick: the tests that use this server do not need in-flight watches
	// to be drained.
	shutdown, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_ = httpServer.Shutdown(shutdown)
	return nil
}

// authenticate lets every request in: with a bearer token as a cluster administrator,
// without one as the anonymous user.
func authenticate(req *http.Request) (*authenticator.Response, bool, error) {
	info := &user.DefaultInfo{Name: user.Anonymous, Groups: []string{user.AllUnauthenticated}}
	if strings.HasPrefix(req.Header.Get("Authorization"), "Bearer ") {
		info = &user.DefaultInfo{Name: "multisite-test", Groups: []string{user.SystemPrivilegedGroup, user.AllAuthenticated}}
	}
	return &authenticator.Response{User: info}, true, nil
}

// noServices resolves no Service: there is no core API, so conversion webhooks can
// only be reached by URL.
type noServices struct{}

func (noServices) ResolveEndpoint(namespace, name string, port int32) (*url.URL, error) {
	return nil, fmt.Errorf("service %s/%s: this server has no Services", namespace, name)
}

// discoveryRoutes answers the root discovery documents.
type discoveryRoutes struct {
	api, apis http.Handler // legacy or aggregated, as the Accept header asks
	crds      listers.CustomResourceDefinitionLister
	builtin   discovery.GroupLister
	addresses discovery.Addresses
}

func (d *discoveryRoutes) wrap(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.Method == http.MethodGet && d.apis != nil {
			switch strings.TrimSuffix(req.URL.Path, "/") {
			case "/api":
				d.api.ServeHTTP(w, req)
				return
			case "/api/v1":
				resources := &metav1.APIResourceList{GroupVersion: "v1", APIResources: []metav1.APIResource{}}
				responsewriters.WriteObjectNegotiated(apiserver.Codecs, negotiation.DefaultEndpointRestrictions, schema.GroupVersion{}, w, req, http.StatusOK, resources, false)
				return
			case "/apis":
				d.apis.ServeHTTP(w, req)
				return
			}
		}
		next.ServeHTTP(w, req)
	})
}

func (d *discoveryRoutes) serveAPI(w http.ResponseWriter, req *http.Request) {
	versions := &metav1.APIVersions{
		Versions:                   []string{"v1"},
		ServerAddressByClientCIDRs: d.addresses.ServerAddressByClientCIDRs(utilnet.GetClientIP(req)),
	}
	responsewriters.WriteObjectNegotiated(apiserver.Codecs, negotiation.DefaultEndpointRestrictions, schema.GroupVersion{}, w, req, http.StatusOK, versions, false)
}

func (d *discoveryRoutes) serveAPIs(w http.ResponseWriter, req *http.Request) {
	groups, err := d.builtin.Groups(req.Context(), req)
	if err != nil {
		responsewriters.InternalError(w, req, err)
		return
	}
	crds, err := d.crds.List(labels.Everything())
	if err != nil {
		responsewriters.InternalError(w, req, err)
		return
	}
	// The served versions of each group's Established CRDs, highest priority first
	// (v2 > v1 > v1beta1 > v1alpha1), as kube-apiserver lists them.
	served := map[string]map[string]bool{}
	for _, crd := range crds {
		if !established(crd) {
			continue
		}
		for _, v := range crd.Spec.Versions {
			if v.Served {
				if served[crd.Spec.Group] == nil {
					served[crd.Spec.Group] = map[string]bool{}
				}
				served[crd.Spec.Group][v.Name] = true
			}
		}
	}
	names := make([]string, 0, len(served))
	for name := range served {
		names = append(names, name)
	}
	sort.Strings(names)
	cidrs := d.addresses.ServerAddressByClientCIDRs(utilnet.GetClientIP(req))
	for i := range groups {
		groups[i].ServerAddressByClientCIDRs = cidrs
	}
	for _, name := range names {
		versions := make([]string, 0, len(served[name]))
		for v := range served[name] {
			versions = append(versions, v)
		}
		sort.Slice(versions, func(i, j int) bool { return version.CompareKubeAwareVersionStrings(versions[i], versions[j]) > 0 })
		group := metav1.APIGroup{Name: name, ServerAddressByClientCIDRs: cidrs}
		for _, v := range versions {
			group.Versions = append(group.Versions, metav1.GroupVersionForDiscovery{GroupVersion: name + "/" + v, Version: v})
		}
		group.PreferredVersion = group.Versions[0]
		groups = append(groups, group)
	}
	responsewriters.WriteObjectNegotiated(apiserver.Codecs, negotiation.DefaultEndpointRestrictions, schema.GroupVersion{}, w, req, http.StatusOK, &metav1.APIGroupList{Groups: groups}, false)
}

func established(crd *apiextensionsv1.CustomResourceDefinition) bool {
	for _, c := range crd.Status.Conditions {
		if c.Type == apiextensionsv1.Established {
			return c.Status == apiextensionsv1.ConditionTrue
		}
	}
	return false
}
