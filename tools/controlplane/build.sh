#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kwok, helm) and fake-gcs-server (the Google Cloud Storage
# emulator the gs:// checkpoint test runs against) from published Go modules into a
# versioned cache directory outside the repository, and reuses whatever is already there.
#
#   tools/controlplane/build.sh [BIN_DIR]
#
# BIN_DIR defaults to $AMPACITY_CACHE/controlplane/$KEY/bin
# (AMPACITY_CACHE defaults to ~/.cache/ampacity). The key names every version
# pinned below, so bumping one builds into a fresh directory.
set -euo pipefail

K8S_VERSION=v1.37.2
ETCD_VERSION=v3.6.16
KWOK_VERSION=v0.8.0
HELM_VERSION=v3.22.0
FAKE_GCS_VERSION=v1.56.1
K8S_MINOR=${K8S_VERSION#v1.}; K8S_MINOR=${K8S_MINOR%%.*}
KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helm-${HELM_VERSION}"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
bin=${1:-${AMPACITY_CACHE:-$HOME/.cache/ampacity}/controlplane/$KEY/bin}
mkdir -p "$bin"

export CGO_ENABLED=0 GOFLAGS=-mod=mod
# shellcheck source=heartbeat.sh
source "$here/heartbeat.sh"
have() { [ -x "$bin/$1" ]; }

if ! have etcd; then
  step "building etcd $ETCD_VERSION (about 2-4 min cold)"
  (cd "$here/etcd" && timed etcd go build -trimpath -ldflags "-s -w" -o "$bin/etcd.tmp" . && mv "$bin/etcd.tmp" "$bin/etcd")
fi

k8s_cmds=()
for c in kube-apiserver kube-controller-manager kube-scheduler; do have "$c" || k8s_cmds+=("$c"); done
if [ ${#k8s_cmds[@]} -gt 0 ]; then
  step "building ${k8s_cmds[*]} $K8S_VERSION (the long one: 15-40 min cold on 2 cores)"
  # Unstamped binaries report v0.0.0-master, which breaks helm's kubeVersion
  # checks and kubectl's skew logic: stamp the version like hack/lib/version.sh.
  ldf="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldf="$ldf -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$K8S_MINOR"
    ldf="$ldf -X $p.gitCommit=gomod-$K8S_VERSION -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  tmp=$(mktemp -d "$bin/.k8s.XXXX")
  pkgs=()
  for c in "${k8s_cmds[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
  (cd "$here/k8s" && timed "${k8s_cmds[*]}" go build -trimpath -buildvcs=false -tags=selinux,notest,grpcnotrace \
    -ldflags="$ldf" -o "$tmp/" "${pkgs[@]}")
  mv "$tmp"/* "$bin/" && rmdir "$tmp"
fi

if ! have kwok; then
  step "building kwok $KWOK_VERSION"
  GOBIN=$bin timed kwok go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
fi

if ! have helm; then
  step "building helm $HELM_VERSION"
  GOBIN=$bin timed helm go install -trimpath -ldflags "-s -w \
    -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 \
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$K8S_MINOR" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi

# A test tool, not part of the control plane: kept out of KEY (adding it must not rebuild
# Kubernetes) and versioned by a stamp file beside it instead.
if ! have fake-gcs-server || [ ! -e "$bin/.fake-gcs-server-$FAKE_GCS_VERSION" ]; then
  step "building fake-gcs-server $FAKE_GCS_VERSION"
  GOBIN=$bin timed fake-gcs-server go install -trimpath -ldflags "-s -w" \
    "github.com/fsouza/fake-gcs-server@$FAKE_GCS_VERSION"
  touch "$bin/.fake-gcs-server-$FAKE_GCS_VERSION"
fi

# kwok's stage definitions ship inside its module; keep them next to the binary.
if [ ! -d "$bin/../kwok-stages" ]; then
  dir=$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
  cp -r "$dir/kustomize/stage" "$bin/../kwok-stages.tmp" && chmod -R u+w "$bin/../kwok-stages.tmp"
  mv "$bin/../kwok-stages.tmp" "$bin/../kwok-stages"
fi

echo "$bin"
