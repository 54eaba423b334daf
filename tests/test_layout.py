"""The layout holds: import-linter's contracts in pyproject.toml (layers from the commands down to the models, no
import cycles, no dataset tools below the commands), and no module takes another's private names."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache", "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 kept, 0 broken" in result.stdout


def private_imports(folder: Path) -> list[str]:
    """`from sdtune.x import _name` (or data_prep's) anywhere under `folder`: a private name used outside its module."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("sdtune", "data_prep"):
                found += [f"{path.relative_to(folder)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
    return found


def test_no_module_imports_another_modules_private_names(tmp_path):
    assert private_imports(ROOT / "sdtune") + private_imports(ROOT / "data_prep") == []
    (tmp_path / "a.py").write_text("from sdtune.models.pretrained import _secret, public\n")
    assert private_imports(tmp_path) == ["a.py: sdtune.models.pretrained._secret"]
