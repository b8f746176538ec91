#!/usr/bin/env bash
# The demo, once every node has joined: the workload of vagrant/manifests/, kpy's CLI
# on this node, and `kpy check` against the cluster. Runs on the last node up; run it
# again from any node with `sudo bash /kpy/vagrant/provision/demo.sh`.
set -euo pipefail
# Vagrant runs a copy of this script from /tmp; its neighbours are in the synced folder.
# shellcheck source=lib.sh
source /kpy/vagrant/provision/lib.sh
export KUBECONFIG=$CLUSTER_DIR/admin.conf
VENV=/opt/kpy

say "every node Ready, kpy ready on every node"
kubectl wait --for=condition=Ready nodes --all --timeout=10m
kubectl -n kube-system rollout status daemonset/kpy --timeout=10m
kubectl get nodes -o wide

say "the demo workload (vagrant/manifests/)"
kubectl apply -f /kpy/vagrant/manifests/
kubectl -n kpy-demo rollout status deployment/echo --timeout=10m
kubectl -n kpy-demo get services,endpointslices -o wide

say "kpy's command line (a venv in $VENV)"
if [[ ! -x $VENV/bin/kpy ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --upgrade pip
  "$VENV/bin/pip" install --quiet /kpy
fi

say "kpy check: every Service, from a netshoot pod, through the API"
"$VENV/bin/kpy" check --kubeconfig "$KUBECONFIG"
