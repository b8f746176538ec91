#!/usr/bin/env bash
# See kpy work, in one command, on a fresh Debian/Ubuntu machine:
#
#   sudo ./scripts/demo.sh [--keep] [--backend NAME] [--nodes N]
#
# 1. installs what is missing (apt packages and a .venv with kpy: scripts/setup.sh)
# 2. brings up a small cluster made of network namespaces — nodes, pods running an
#    echo server, an external client — with one kpy agent per node (`kpy lab up`)
# 3. checks every Service in examples/ the way you would from a netshoot pod
#    (`kpy check`: curl, nc -u, dig — each with the behaviour it must show)
# 4. prints what each node's backend programmed (`kpy dump`)
# 5. takes the lab down again (unless --keep), also if anything above fails
#
# Nothing is changed in this machine's own network: every rule, route and address
# lives in the lab's namespaces (kpy-lab-*), which are deleted at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

KEEP=0
BACKEND=nftables
NODES=2
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
  case "$1" in
    --keep) KEEP=1 ;;
    --backend) BACKEND=${2:?--backend needs a name}; shift ;;
    --nodes) NODES=${2:?--nodes needs a number}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ $(id -u) -ne 0 ]]; then
  echo "error: the lab creates network namespaces, which needs root: sudo $0 $*" >&2
  exit 1
fi

bold=$'\033[1m' dim=$'\033[2m' reset=$'\033[0m'
[[ -t 1 ]] || { bold='' dim='' reset=''; }
step() { printf '\n%s==> %s%s\n' "$bold" "$*" "$reset"; }
note() { printf '%s    %s%s\n' "$dim" "$*" "$reset"; }

step "1/5  Installing what is missing (system tools via apt, kpy into .venv)"
./scripts/setup.sh
KPY=.venv/bin/kpy

# shellcheck disable=SC2317  # invoked by the EXIT trap
teardown() {
  if ((KEEP)); then
    step "The lab is still up (--keep). Try, for example:"
    note "sudo ip netns exec kpy-lab-pod-1a curl -s http://10.96.0.10/      # ClusterIP from a pod"
    note "sudo ip netns exec kpy-lab-client curl -s http://192.168.100.12:30080/   # NodePort"
    note "$KPY lab status;  $KPY check;  edit examples/*.yaml and check again"
    note "$KPY lab down     # removes everything"
  else
    step "5/5  Taking the lab down"
    "$KPY" lab down
  fi
}

step "2/5  Bringing up a ${NODES}-node lab in network namespaces (backend: ${BACKEND})"
note "underlay 192.168.100.0/24: node-i = .1i, external client = .100"
note "pods: 10.244.i.0/24 on node-i (pod-ia = .2, pod-ib = .3), each running an echo server"
note "Services and EndpointSlices: examples/*.yaml (every Service type and policy)"
"$KPY" lab down >/dev/null  # leftovers of an earlier run, if any
trap teardown EXIT
"$KPY" lab up --nodes "$NODES" --backend "$BACKEND" --manifests examples

step "3/5  Checking every Service, as you would with netshoot (curl, nc -u, dig)"
note "each row: Service x check x source, the command it corresponds to, PASS/FAIL and why"
status=0
"$KPY" check || status=$?

step "4/5  What each node programmed (kpy dump: desired state, read back from the kernel)"
for ((i = 1; i <= NODES; i++)); do
  printf '\n%s--- node-%d (namespace kpy-lab-node-%d) ---%s\n' "$bold" "$i" "$i" "$reset"
  "$KPY" dump --manifests examples --node "node-$i" \
    --node-ip "192.168.100.1$i" --node-ip "fd00:100::1$i" \
    --backend "$BACKEND" --netns "kpy-lab-node-$i" || status=$?
done

if ((status == 0)); then
  step "Every check passed: kpy programs Services correctly with the ${BACKEND} backend."
else
  step "Some checks FAILED (see the reasons above)."
fi
exit "$status"
