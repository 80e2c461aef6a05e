"""ola_model is pure model code: it imports no serving or MLOps library (STYLE.md)."""

import subprocess
import sys

FORBIDDEN = ("grpc", "ray", "mlflow", "deepspeed", "redis", "kubernetes", "services", "workflows", "boto3")


def test_ola_model_imports_no_serving_or_mlops_library():
    code = (
        "import sys, ola_model, ola_model.cli, ola_model.checkpoint.components, ola_model.inference\n"
        f"bad = sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))\n"
        "print(','.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"ola_model imported {r.stdout.strip()}"
