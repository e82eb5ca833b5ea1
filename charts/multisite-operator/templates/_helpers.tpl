{{/*
Chart name, overridable with nameOverride; 63 characters at most (label value limit).
*/}}
{{- define "multisite-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name used for every object of the release. A release already named after the
chart is not repeated ("multisite-operator", not "multisite-operator-multisite-operator").
*/}}
{{- define "multisite-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Chart label value: name-version.
*/}}
{{- define "multisite-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Labels that select the operator pods. Never change these between releases: a
Deployment's selector is immutable.
*/}}
{{- define "multisite-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "multisite-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/*
Labels on every object of the release.
*/}}
{{- define "multisite-operator.labels" -}}
helm.sh/chart: {{ include "multisite-operator.chart" . }}
{{ include "multisite-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: multisite
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/*
Name of the ServiceAccount the operator runs as.
*/}}
{{- define "multisite-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "multisite-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Container image reference: repository@digest when a digest is given, else repository:tag
with the tag defaulting to the chart's appVersion.
*/}}
{{- define "multisite-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/*
The watched namespaces, without duplicates or empty entries, as a list.
*/}}
{{- define "multisite-operator.watchNamespaces" -}}
{{- $out := list -}}
{{- range .Values.watchNamespaces -}}
{{- if . -}}
{{- $out = append $out (toString .) -}}
{{- end -}}
{{- end -}}
{{- toJson ($out | uniq) -}}
{{- end -}}

{{/*
Checks of value combinations the schema cannot express; fails the render with a
message saying what to change.
*/}}
{{- define "multisite-operator.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) -}}
{{- fail (printf "replicaCount is %d but leaderElection.enabled is false: several operator pods would act at once. Set leaderElection.enabled=true or replicaCount=1." (int .Values.replicaCount)) -}}
{{- end -}}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled is true but metrics.enabled is false: the ServiceMonitor needs the metrics Service. Set metrics.enabled=true or metrics.serviceMonitor.enabled=false." -}}
{{- end -}}
{{- if and (not .Values.serviceAccount.create) .Values.rbac.create (not .Values.serviceAccount.name) -}}
{{- fail "serviceAccount.create is false and serviceAccount.name is empty: the RBAC bindings would grant the operator's permissions to the namespace's \"default\" ServiceAccount. Name the ServiceAccount to bind (serviceAccount.name) or set serviceAccount.create=true." -}}
{{- end -}}
{{- end -}}

{{/*
The operator's permissions on the namespaces it watches. Used as the rules of the
ClusterRole (all namespaces) or of one Role per watched namespace. No wildcards:
each rule names its API group, resources and verbs.
*/}}
{{- define "multisite-operator.operatorRules" -}}
# The four custom resources: the operator watches them, adds and removes its
# finalizer (patch/update) and never creates or deletes them itself.
- apiGroups: ["multisite.dev"]
  resources: ["replicafamilies", "sites", "replicas", "schemapackages"]
  verbs: ["get", "list", "watch", "patch", "update"]
# Their status subresource: conditions, observedGeneration, upgrade plan, sync state.
- apiGroups: ["multisite.dev"]
  resources: ["replicafamilies/status", "sites/status", "replicas/status", "schemapackages/status"]
  verbs: ["get", "patch", "update"]
# Their finalizers subresource: needed to set owner references with
# blockOwnerDeletion on the objects they own.
- apiGroups: ["multisite.dev"]
  resources: ["replicafamilies/finalizers", "sites/finalizers", "replicas/finalizers", "schemapackages/finalizers"]
  verbs: ["update"]
# Workloads it owns: a StatefulSet per Replica, Deployments for client tiers and the gateway.
- apiGroups: ["apps"]
  resources: ["statefulsets", "deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# Services in front of replicas, clients and the gateway; the replicas' volume claims,
# deleted when a Replica is removed.
- apiGroups: [""]
  resources: ["services", "persistentvolumeclaims"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The family's shared secret for replica-to-replica calls. No delete: its owner
# reference lets the garbage collector remove it with the family.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Replica pods: observed for readiness, deleted to restart a replica after an in-place upgrade.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"]
# Kubernetes Events recording each decision, through either Events API.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}
