#!/usr/bin/env bash
# The control plane: `kubeadm init` without kube-proxy, the kpy image, kpy itself with
# the API server override, then the CNI (flannel) — in that order, because without
# kube-proxy the CNI reaches the API server through the ClusterIP kpy programs.
set -euo pipefail
# Vagrant runs a copy of this script from /tmp; its neighbours are in the synced folder.
# shellcheck source=lib.sh
source /kpy/vagrant/provision/lib.sh
: "${NODE_NAME:?}" "${NODE_IP:?}" "${CONTROL_PLANE_IP:?}" "${POD_CIDR:?}"
FLANNEL_VERSION=${FLANNEL_VERSION:-v0.25.6}
export KUBECONFIG=/etc/kubernetes/admin.conf

if [[ ! -f /etc/kubernetes/admin.conf ]]; then
  say "kubeadm init, kube-proxy skipped"
  rm -rf "$CLUSTER_DIR"
  kubeadm init \
    --skip-phases=addon/kube-proxy \
    --node-name="$NODE_NAME" \
    --apiserver-advertise-address="$NODE_IP" \
    --pod-network-cidr="$POD_CIDR"
fi
mkdir -p "$CLUSTER_DIR" /root/.kube /home/vagrant/.kube
install -m 0600 /etc/kubernetes/admin.conf /root/.kube/config
install -m 0600 -o vagrant -g vagrant /etc/kubernetes/admin.conf /home/vagrant/.kube/config
# The lab's kubeconfig, for the last node's demo and for the host (see README.md).
install -m 0600 /etc/kubernetes/admin.conf "$CLUSTER_DIR/admin.conf"
wait_for 300 "the API server" kubectl get --raw /readyz
if kubectl -n kube-system get daemonset kube-proxy >/dev/null 2>&1; then
  echo "kube-proxy is installed; this lab expects it skipped" >&2
  exit 1
fi

say "the kpy image ($IMAGE), built from deploy/Dockerfile"
if ! ctr -n k8s.io images ls -q | grep -qx "$IMAGE"; then
  apt-get install -y -qq --no-install-recommends buildah >/dev/null
  # --network host: RUN steps use the VM's network, no container network plugins needed.
  buildah build --quiet --layers --network host -f /kpy/deploy/Dockerfile -t "$IMAGE" /kpy
  rm -f "$IMAGE_ARCHIVE.part"
  buildah push --quiet "$IMAGE" "docker-archive:$IMAGE_ARCHIVE.part:$IMAGE"
  mv "$IMAGE_ARCHIVE.part" "$IMAGE_ARCHIVE"
  ctr -n k8s.io images import "$IMAGE_ARCHIVE"
fi

say "kpy: the API server override, then the DaemonSet"
# Without kube-proxy the `kubernetes` Service's ClusterIP answers only once kpy has
# programmed it: kpy itself goes to the API server's own address.
kubectl -n kube-system create configmap kpy-apiserver \
  --from-literal=KUBERNETES_SERVICE_HOST="$CONTROL_PLANE_IP" \
  --from-literal=KUBERNETES_SERVICE_PORT=6443 \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -f /kpy/deploy/daemonset.yaml
kubectl -n kube-system rollout status daemonset/kpy --timeout=10m

say "flannel $FLANNEL_VERSION (its API calls go through kpy's ClusterIP rules)"
# --iface-can-reach: the private network's interface, not VirtualBox's NAT one.
curl -fsSL "https://github.com/flannel-io/flannel/releases/download/${FLANNEL_VERSION}/kube-flannel.yml" \
  | sed "s|^\([[:space:]]*\)- --kube-subnet-mgr\$|&\n\1- --iface-can-reach=${CONTROL_PLANE_IP}|" \
  | kubectl apply -f -
kubectl -n kube-flannel rollout status daemonset/kube-flannel-ds --timeout=10m
wait_for 600 "node $NODE_NAME Ready" kubectl wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s
kubectl -n kube-system rollout status deployment/coredns --timeout=10m

say "the join command for the workers"
kubeadm token create --ttl 2h --print-join-command > "$CLUSTER_DIR/join.sh.part"
mv "$CLUSTER_DIR/join.sh.part" "$CLUSTER_DIR/join.sh"
kubectl get nodes -o wide
