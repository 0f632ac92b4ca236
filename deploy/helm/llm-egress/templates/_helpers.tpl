{{/* Labels shared by every object of the release. */}}
{{- define "llm-egress.labels" -}}
app.kubernetes.io/part-of: llm-egress
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "llm-egress.agentServiceAccount" -}}llm-egress-agent{{- end -}}
{{- define "llm-egress.gatewayServiceAccount" -}}istio-egressgateway-service-account{{- end -}}

{{/* The gateway's DNS name: what the seed's LLMRoute mesh rule names. */}}
{{- define "llm-egress.gatewayHost" -}}
{{ .Values.gateway.serviceName }}.{{ .Values.gateway.namespace }}.svc.cluster.local
{{- end -}}

{{- define "llm-egress.agentSpiffeId" -}}
spiffe://{{ .Values.trustDomain }}/ns/{{ .Values.namespace.name }}/sa/{{ include "llm-egress.agentServiceAccount" . }}
{{- end -}}

{{- define "llm-egress.gatewaySpiffeId" -}}
spiffe://{{ .Values.trustDomain }}/ns/{{ .Values.gateway.namespace }}/sa/{{ include "llm-egress.gatewayServiceAccount" . }}
{{- end -}}

{{- define "llm-egress.issuerRef" -}}
{{- if .Values.certificates.issuerRef.name -}}
{{ toYaml .Values.certificates.issuerRef }}
{{- else -}}
name: llm-egress-ca
kind: Issuer
group: cert-manager.io
{{- end -}}
{{- end -}}

{{/* Namespaces trusted with LLMProviders (and so with keys). */}}
{{- define "llm-egress.trustedNamespaces" -}}
{{- $all := concat (list .Values.gateway.namespace .Values.gateway.rootNamespace) .Values.trust.namespaces -}}
{{- range $all | uniq }}
- --trusted-namespace={{ . }}
{{- end }}
{{- end -}}
