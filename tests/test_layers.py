"""The package's shape: which layer may import which (read from the source), and what each process pays for at
import time (checked in fresh interpreters)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_distqat"

# layer (a folder or module of the package) -> imports it must never make (prefixes)
FORBIDDEN = {
    "expert": ["lightning", "pytorch_lightning", "lightning_distqat.strategy", "lightning_distqat.callbacks"],
    "swarm": ["lightning", "pytorch_lightning", "lightning_distqat.strategy", "lightning_distqat.callbacks"],
    "diloco": ["lightning", "pytorch_lightning", "lightning_distqat.strategy"],
    "quant/codecs.py": ["hivemind", "lightning_distqat.swarm", "lightning_distqat.expert", "lightning"],
    "data": ["lightning_distqat.swarm", "lightning_distqat.expert", "lightning_distqat.diloco", "hivemind"],
    "_process.py": ["lightning", "torch", "hivemind", "lightning_distqat.swarm", "lightning_distqat.config"],
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _files(layer: str) -> list[Path]:
    target = PACKAGE / layer
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_only_what_they_may(layer):
    bad = [f"{path.relative_to(PACKAGE)} imports {name}" for path in _files(layer) for name in _imports(path)
           if any(name == p or name.startswith(p + ".") for p in FORBIDDEN[layer])]
    # the datamodule is the one part of data/ that is Lightning's by nature
    bad = [b for b in bad if not (b.startswith("data/datamodule.py") and " lightning" in b)]
    assert not bad, bad


def test_only_cli_imports_cli():
    bad = [f"{path.relative_to(PACKAGE)} imports {name}" for path in PACKAGE.rglob("*.py")
           if "cli" not in path.relative_to(PACKAGE).parts
           for name in _imports(path) if name.startswith("lightning_distqat.cli")]
    assert not bad, bad


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return set(json.loads(result.stdout.splitlines()[-1]))


def _top(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_importing_the_package_is_light_and_its_names_load_on_use():
    assert not _top(_modules_after("import lightning_distqat")) & {"torch", "lightning", "hivemind"}
    loaded = _modules_after("from lightning_distqat import DistqatStrategy, QuantConfig")
    assert {"lightning", "hivemind"} <= _top(loaded)


def test_trainer_strategy_name_resolves_in_either_import_order():
    for statement in ("import lightning_distqat\nimport lightning.pytorch as pl",
                      "import lightning.pytorch as pl\nimport lightning_distqat"):
        code = statement + "\nassert type(pl.Trainer(strategy='distqat', logger=False).strategy).__name__ == " \
                           "'DistqatStrategy'"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]


def test_an_expert_and_the_data_server_import_no_lightning():
    expert = _top(_modules_after("import lightning_distqat.expert.__main__, lightning_distqat.expert.server"))
    assert "hivemind" in expert and not expert & {"lightning", "pytorch_lightning", "transformers"}
    data = _top(_modules_after("import lightning_distqat.data.child, lightning_distqat.data.server"))
    assert "numpy" in data and not data & {"torch", "lightning", "pytorch_lightning", "hivemind"}


def test_a_serving_data_server_has_no_torch_mapped():
    """Not only at import: once it has loaded, transformed and cached a dataset, the embedded data server's process
    has no torch library mapped (torch alone costs a process ~280 MiB of private memory)."""
    from lightning_distqat import DataConfig
    from lightning_distqat.data.embedded import EmbeddedDataServer

    server = EmbeddedDataServer(DataConfig(source="sklearn-digits", image_size=16, batch_size=32, name="no-torch"))
    try:
        server.start()
        with open(f"/proc/{server.pid}/maps") as f:
            libraries = {line.split()[-1] for line in f if ".so" in line}
        assert not [lib for lib in libraries if "torch" in Path(lib).name], sorted(libraries)
    finally:
        server.shutdown()


def test_the_package_leaves_the_users_warning_filters_alone():
    code = ("import warnings, lightning.pytorch, hivemind\nbefore = list(warnings.filters)\n"
            "import lightning_distqat.strategy, lightning_distqat.expert.server, lightning_distqat.data.server\n"
            "assert warnings.filters == before, [f for f in warnings.filters if f not in before]")
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
