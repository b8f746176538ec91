#!/usr/bin/env bash
# Shared by the provisioning scripts (sourced, not run).

# shellcheck disable=SC2034  # these are for the scripts that source this file

# Where the control plane leaves what the workers need (the repository is at /kpy).
CLUSTER_DIR=/kpy/vagrant/.cluster
# The image deploy/daemonset.yaml runs; built on the control plane, imported everywhere.
IMAGE=ghcr.io/kpy-project/kpy:0.1.0
IMAGE_ARCHIVE=$CLUSTER_DIR/kpy-image.tar

say() {
  printf '\n==> [%s] %s\n' "${NODE_NAME:-node}" "$*"
}

# wait_for SECONDS DESCRIPTION COMMAND...: retry COMMAND every 5 s until it succeeds.
wait_for() {
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "timed out waiting for: $what" >&2
      return 1
    fi
    sleep 5
  done
}

# node_has_ready_kpy NODE: the kpy pod on NODE reports Ready (its first sync is done).
node_has_ready_kpy() {
  kubectl -n kube-system get pods -l app.kubernetes.io/name=kpy \
    --field-selector "spec.nodeName=$1" \
    -o jsonpath='{.items[*].status.conditions[?(@.type=="Ready")].status}' | grep -qx True
}
