#!/usr/bin/env bash
# Every node: kernel settings, containerd, and kubeadm/kubelet/kubectl — what kubeadm
# needs before `init` or `join`. Idempotent (a second `vagrant provision` is harmless).
set -euo pipefail
# Vagrant runs a copy of this script from /tmp; its neighbours are in the synced folder.
# shellcheck source=lib.sh
source /kpy/vagrant/provision/lib.sh
: "${NODE_NAME:?}" "${NODE_IP:?}" "${KUBERNETES:?}" "${HOSTS:?}"
export DEBIAN_FRONTEND=noninteractive

say "hosts, swap, kernel modules, sysctls"
sed -i '/ kpy-\(cp\|w[0-9]\+\)$/d' /etc/hosts
printf '%s\n' "$HOSTS" >> /etc/hosts
swapoff -a
sed -i '/\sswap\s/s/^\([^#]\)/#\1/' /etc/fstab
# br_netfilter: bridged pod traffic passes netfilter (kpy's rules); overlay: containerd.
# ip_vs*: so kpy's ipvs backend can be tried by editing kpy-config (mode: ipvs).
cat > /etc/modules-load.d/kpy-lab.conf <<'MODULES'
overlay
br_netfilter
nf_conntrack
ip_vs
ip_vs_rr
ip_vs_wrr
ip_vs_sh
MODULES
systemctl restart systemd-modules-load.service
cat > /etc/sysctl.d/90-kpy-lab.conf <<'SYSCTLS'
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
net.bridge.bridge-nf-call-ip6tables = 1
net.ipv4.vs.conntrack = 1
net.ipv4.vs.expire_nodest_conn = 1
net.ipv4.vs.expire_quiescent_template = 1
net.ipv4.vs.conn_reuse_mode = 0
SYSCTLS
sysctl --quiet --system

say "packages: containerd, kernel tools"
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  apt-transport-https ca-certificates curl gpg \
  containerd conntrack socat ethtool ebtables iptables nftables ipset ipvsadm iproute2 \
  python3 python3-venv >/dev/null

# The systemd cgroup driver, as the kubelet (kubeadm's default) uses.
mkdir -p /etc/containerd
if [[ ! -s /etc/containerd/config.toml ]] || ! grep -q 'SystemdCgroup = true' /etc/containerd/config.toml; then
  containerd config default > /etc/containerd/config.toml
  sed -i 's/SystemdCgroup = false/SystemdCgroup = true/' /etc/containerd/config.toml
  sed -i 's#sandbox_image = .*#sandbox_image = "registry.k8s.io/pause:3.9"#' /etc/containerd/config.toml
fi
systemctl enable containerd >/dev/null
systemctl restart containerd

say "kubeadm, kubelet, kubectl ${KUBERNETES}"
install -d -m 0755 /etc/apt/keyrings
repo="https://pkgs.k8s.io/core:/stable:/v${KUBERNETES}/deb/"
if [[ ! -s /etc/apt/keyrings/kubernetes-apt-keyring.gpg ]]; then
  curl -fsSL "${repo}Release.key" | gpg --dearmor -o /etc/apt/keyrings/kubernetes-apt-keyring.gpg
fi
echo "deb [signed-by=/etc/apt/keyrings/kubernetes-apt-keyring.gpg] ${repo} /" \
  > /etc/apt/sources.list.d/kubernetes.list
apt-get update -qq
apt-get install -y -qq kubelet kubeadm kubectl >/dev/null
apt-mark hold kubelet kubeadm kubectl >/dev/null

# The private network's address, not the NAT interface's (the same 10.0.2.15 on every
# VirtualBox machine): the node's InternalIP, which kpy serves NodePorts on.
echo "KUBELET_EXTRA_ARGS=--node-ip=${NODE_IP}" > /etc/default/kubelet
systemctl enable kubelet >/dev/null
systemctl restart kubelet
