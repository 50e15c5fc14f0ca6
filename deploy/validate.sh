#!/usr/bin/env bash
# Offline validation of every Kubernetes manifest under deploy/ against Kubernetes 1.29 (the
# minimum weft supports: native sidecars are on by default from 1.29). Kustomization files are
# not Kubernetes objects and are skipped; the injector's golden pods are validated too; CRD-based kinds (HTTPRoute) are skipped by the tool.
set -euo pipefail
cd "$(dirname "$0")"
command -v kubernetes-validate >/dev/null || pip install -q kubernetes-validate
mapfile -t files < <(find . -name '*.yaml' ! -name kustomization.yaml | sort)
# The injector's golden outputs are pods the API server must accept too.
files+=(../control-plane/tests/data/inject/*.golden.yaml)
kubernetes-validate --strict -k 1.29.0 "${files[@]}"
