"""`python -m sidecar.deploy_render`: write deploy/k8s/ and deploy/istio/ from the mesh policy, or with
`--check` report (exit 1) any rendered file that differs from what is committed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sidecar import istio_render, k8s_render
from sidecar.policy import PolicyError, load_policy


def rendered(policy_path: Path, k8s_dir: Path, istio_dir: Path, label: str | None = None) -> dict[Path, str]:
    """Every manifest file path → its content."""
    policy = load_policy(policy_path)
    name = label or str(policy_path)
    out = {k8s_dir / f: text for f, text in k8s_render.render_files(policy, name).items()}
    out.update({istio_dir / f: text for f, text in istio_render.render_files(policy, name).items()})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sidecar.deploy_render", description=__doc__)
    parser.add_argument("--policy", type=Path, default=Path("deploy/policy/mesh-policy.yaml"))
    parser.add_argument("--k8s", type=Path, default=Path("deploy/k8s"))
    parser.add_argument("--istio", type=Path, default=Path("deploy/istio"))
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a file would change")
    args = parser.parse_args(argv)
    try:
        files = rendered(args.policy, args.k8s, args.istio)
    except (PolicyError, ValueError) as exc:
        print(f"deploy_render: {exc}", file=sys.stderr)
        return 2
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"{path}: out of date with {args.policy}; run `make deploy-manifests`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
