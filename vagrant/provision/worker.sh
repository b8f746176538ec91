#!/usr/bin/env bash
# A worker: the kpy image from the control plane, then `kubeadm join`. The kpy
# DaemonSet (tolerating every taint) starts on it as soon as it has joined.
set -euo pipefail
# Vagrant runs a copy of this script from /tmp; its neighbours are in the synced folder.
# shellcheck source=lib.sh
source /kpy/vagrant/provision/lib.sh
: "${NODE_NAME:?}"

say "waiting for the control plane's join command"
wait_for 1800 "$CLUSTER_DIR/join.sh (is kpy-cp up?)" test -s "$CLUSTER_DIR/join.sh"

if ! ctr -n k8s.io images ls -q | grep -qx "$IMAGE"; then
  say "importing the kpy image"
  ctr -n k8s.io images import "$IMAGE_ARCHIVE"
fi

if [[ ! -f /etc/kubernetes/kubelet.conf ]]; then
  say "kubeadm join"
  read -r -a join < "$CLUSTER_DIR/join.sh"
  "${join[@]}" --node-name="$NODE_NAME"
fi

export KUBECONFIG=$CLUSTER_DIR/admin.conf
wait_for 600 "node $NODE_NAME Ready" kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s
wait_for 300 "kpy ready on $NODE_NAME" node_has_ready_kpy "$NODE_NAME"
