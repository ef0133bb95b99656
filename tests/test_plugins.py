"""Plugins: the registry is a leaf, `cl list` imports nothing heavy, strategies from a file (``--import``,
``plugins:``) and from an installed package's entry points run end to end, and the README tutorial runs."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cl.cli import main
from cl.plugins import listing
from cl.registry import BENCHMARKS, PEFT, STRATEGIES, PluginError, Registry
from tests.conftest import tiny_config, write_yaml

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {"strategies": STRATEGIES, "benchmarks": BENCHMARKS, "peft": PEFT}

PLUGIN = '''
"""A plugin strategy: a frozen-feature nearest class mean, written outside the package."""
from typing import Literal

import torch
from pydantic import Field

from cl.config import StrategyConfig
from cl.registry import STRATEGIES
from cl.strategies.base import Strategy


class NCMConfig(StrategyConfig):
    name: Literal["{name}"] = "{name}"
    shrink: float = Field(0.0, ge=0, description="pull every mean towards zero by this fraction")


@STRATEGIES.register("{name}", config=NCMConfig)
class NCM(Strategy):
    """nearest class mean, from a plugin"""
    max_epochs = 1
    stateful = ("sums", "counts")

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.sums = torch.zeros(ctx.n_classes, ctx.feature_dim, device=self.device)
        self.counts = torch.zeros(ctx.n_classes, device=self.device)

    @torch.no_grad()
    def observe(self, x, y, task_id):
        y = y.to(self.device)
        self.sums.index_add_(0, y, self.encode(x))
        self.counts.index_add_(0, y, torch.ones(len(y), device=self.device))
        return {{}}

    @torch.no_grad()
    def predict(self, x, task_id):
        means = (1 - self.cfg.shrink) * self.sums / self.counts.clamp(min=1)[:, None]
        return (-torch.cdist(self.encode(x), means)).masked_fill(self.counts[None, :] == 0, float("-inf"))
'''


@pytest.fixture(autouse=True)
def isolated_registries():
    """Plugins registered in this process by a test are gone after it (other tests list the registries)."""
    from cl import plugins

    imported = dict(plugins._IMPORTED)
    yield
    for family in FAMILIES.values():
        for name in set(family._entries) - set(family.declared()):
            del family._entries[name]
    plugins._IMPORTED.clear()
    plugins._IMPORTED.update(imported)
    for name in [m for m in sys.modules if m.startswith("cl_plugin_")]:
        del sys.modules[name]


def write_plugin(path: Path, name: str) -> Path:
    path.write_text(PLUGIN.format(name=name))
    return path


def run_cl(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cl", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


# ---- structure ---------------------------------------------------------------------------------


def test_the_registry_imports_nothing_of_ours():
    tree = ast.parse((ROOT / "cl" / "registry.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    ours = {m for m in imported if m.split(".")[0] in ("cl", "strategies", "analysis")}
    assert not ours, ours


def test_every_registered_name_is_declared_as_an_entry_point():
    # importing every built-in module registers its names; each must be declared in pyproject.toml
    import importlib
    import pkgutil

    import cl.peft  # noqa: F401  (imports every PEFT file)
    import cl.data.sources  # noqa: F401
    for mod in pkgutil.iter_modules([str(ROOT / "strategies")]):
        importlib.import_module(f"cl.strategies.{mod.name}")
    for family in FAMILIES.values():
        assert set(family._entries) == set(family.declared()), family.family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_listing_without_importing_shows_what_the_registry_holds(family):
    # the fast path reads help from source text; it must say what the imported registry says
    assert listing(FAMILIES[family]) == FAMILIES[family].describe()


def test_cl_list_imports_no_heavy_module():
    code = ("import sys\nfrom cl.cli import main\n"
            "for f in ('strategies', 'benchmarks', 'peft'): assert main(['list', f]) == 0\n"
            "heavy = [m for m in ('torch', 'timm', 'avalanche', 'numpy', 'pydantic', 'cl.strategies.er', 'cl.data.sources', 'cl.config') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout
    assert re.search(r"^er\s+experience replay", out.stdout, re.M) and re.search(r"^lora\s+LoRA", out.stdout, re.M)


def test_a_lookup_imports_only_the_declaring_module():
    code = ("import sys\nfrom cl.registry import STRATEGIES\nSTRATEGIES.get('simplecil')\n"
            "print('LOADED', sorted(m for m in sys.modules if m.startswith('cl.strategies.') and m != 'cl.strategies.base'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert "LOADED ['cl.strategies.simplecil']" in out.stdout, out.stdout + out.stderr


# ---- a plugin file -------------------------------------------------------------------------------


def test_import_a_file_runs_end_to_end_and_is_recorded(tmp, capsys):
    plugin = write_plugin(tmp / "ncm_plugin.py", "ncm_file")
    cfg = write_yaml(tmp / "run.yaml", tiny_config(tmp, strategy={"name": "ncm_file", "shrink": 0.0}))
    assert main(["run", str(cfg), "--import", str(plugin)]) == 0
    run_dir = tmp / "runs" / "tiny" / "ncm_file" / "seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["final_acc"] > 1 / 6  # better than chance on the synthetic stream
    env = json.loads((run_dir / "env.json").read_text())
    import hashlib

    assert env["plugins"] == [{"plugin": str(plugin), "module": "cl_plugin_ncm_plugin", "file": str(plugin.resolve()),
                               "sha256": hashlib.sha256(plugin.read_bytes()).hexdigest()}]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["plugins"] == [str(plugin)]
    # the same run again is recognised as finished (identity from the plugin's module name)
    capsys.readouterr()
    assert main(["run", str(cfg), "--import", str(plugin), "--resume"]) == 0
    # listed and described once imported
    assert main(["list", "strategies", "ncm*", "--import", str(plugin)]) == 0
    assert re.search(r"^ncm_file\s+nearest class mean, from a plugin$", capsys.readouterr().out, re.M)
    assert main(["describe", "ncm_file", "--import", str(plugin)]) == 0
    assert "shrink" in capsys.readouterr().out


def test_a_plugin_cannot_stand_in_for_a_declared_name(tmp):
    # a file registering "er" would otherwise run its own code under the built-in's name
    impostor = write_plugin(tmp / "impostor.py", "er")
    cfg = write_yaml(tmp / "run.yaml", tiny_config(tmp))
    out = run_cl("run", str(cfg), "--import", str(impostor))
    assert out.returncode == 2 and "strategy 'er' belongs to cl-pretrained (cl.strategies.er)" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp / "runs").exists()


def test_plugins_in_the_yaml_are_relative_to_it_and_reach_sweep_workers(tmp):
    (tmp / "conf").mkdir()
    write_plugin(tmp / "conf" / "ncm_sweep.py", "ncm_sweep")
    base = tiny_config(tmp, strategy={"name": "ncm_sweep"}, plugins=["./ncm_sweep.py"])
    write_yaml(tmp / "conf" / "base.yaml", base)
    suite = write_yaml(tmp / "conf" / "suite.yaml", {"suite": "plug", "config": "base.yaml", "seeds": [0, 1],
                                                     "strategies": [{"name": "ncm_sweep", "overrides": {}}]})
    # two spawned worker processes: each imports the plugin from the config before validating it
    out = run_cl("sweep", str(suite), "--jobs", "2", cwd=tmp)
    assert out.returncode == 0, out.stdout + out.stderr
    for seed in (0, 1):
        assert (tmp / "runs" / "plug" / "ncm_sweep" / f"seed{seed}" / "metrics.json").is_file()


def test_a_moved_plugin_file_keeps_the_run_identity(tmp):
    from cl.config import parse_run_config
    from cl.engine.rundir import result_hash

    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    a = write_plugin(tmp / "a" / "ncm_moved.py", "ncm_moved")
    first = result_hash(parse_run_config(tiny_config(tmp, strategy={"name": "ncm_moved"}, plugins=[str(a)])))
    # as if in another process, on a machine where the file lies elsewhere
    sys.modules.pop("cl_plugin_ncm_moved")
    from cl import plugins

    plugins._IMPORTED.clear()
    STRATEGIES._entries.pop("ncm_moved")
    b = write_plugin(tmp / "b" / "ncm_moved.py", "ncm_moved")
    assert result_hash(parse_run_config(tiny_config(tmp, strategy={"name": "ncm_moved"}, plugins=[str(b)]))) == first


def test_plugin_failures_are_one_line(tmp):
    cfg = write_yaml(tmp / "run.yaml", tiny_config(tmp))
    out = run_cl("run", str(cfg), "--import", str(tmp / "absent.py"))
    assert out.returncode == 2 and out.stderr.strip() == f"error: plugins: no such file: {tmp / 'absent.py'}"
    (tmp / "broken.py").write_text("def oops(:\n")
    out = run_cl("run", str(cfg), "--import", str(tmp / "broken.py"))
    assert out.returncode == 2 and out.stderr.startswith("error: plugins:") and "SyntaxError" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = run_cl("run", str(cfg), "--import", "no_such_module_xyz")
    assert out.returncode == 2 and "no module named 'no_such_module_xyz'" in out.stderr
    assert not (tmp / "runs").exists()
    out = run_cl("tune", str(cfg), "--import", "x")
    assert out.returncode == 2 and "plugins:" in out.stderr


# ---- an installed package's entry points ---------------------------------------------------------


def fake_distribution(site: Path, dist: str, entry_points: str, modules: dict[str, str]) -> None:
    """What pip leaves in site-packages for a package declaring entry points."""
    info = site / f"{dist}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    for name, text in modules.items():
        (site / f"{name}.py").write_text(text)


def test_an_entry_point_strategy_runs_end_to_end(tmp):
    site = tmp / "site"
    fake_distribution(site, "ncm_pkg", "[cl.strategies]\nncm_ep = ncm_ep_module\n", {"ncm_ep_module": PLUGIN.format(name="ncm_ep")})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    out = run_cl("list", "strategies", env=env)
    assert re.search(r"^ncm_ep\s+nearest class mean, from a plugin$", out.stdout, re.M), out.stdout + out.stderr
    cfg = write_yaml(tmp / "run.yaml", tiny_config(tmp, strategy={"name": "ncm_ep"}))
    out = run_cl("run", str(cfg), env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp / "runs" / "tiny" / "ncm_ep" / "seed0" / "metrics.json").is_file()


def test_broken_entry_points_are_one_line(tmp):
    # two distributions declaring one name: refused, naming both
    site = tmp / "site"
    fake_distribution(site, "clash", "[cl.strategies]\ner = clash_module\n", {"clash_module": "X = 1\n"})
    sys.path.insert(0, str(site))
    try:
        with pytest.raises(PluginError, match=r"'er' of group cl.strategies is declared twice: by (clash|cl-pretrained) .* and by (clash|cl-pretrained) "):
            Registry("strategy", "cl.strategies").entry("er")
    finally:
        sys.path.remove(str(site))
    # an entry point whose module registers nothing under its name
    site2 = tmp / "site2"
    fake_distribution(site2, "liar", "[cl.strategies]\nliar = liar_module\n", {"liar_module": "X = 1\n"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site2), str(ROOT)])}
    cfg = write_yaml(tmp / "run.yaml", tiny_config(tmp, strategy={"name": "liar"}))
    out = run_cl("run", str(cfg), env=env)
    assert out.returncode == 2 and "which registers no strategy of that name" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp / "runs").exists()


# ---- the README tutorial -------------------------------------------------------------------------


def tutorial_blocks() -> dict[str, str]:
    readme = (ROOT / "README.md").read_text()
    return dict(re.findall(r"<!-- tutorial: (\S+) -->\n```\w+\n(.*?)```", readme, re.S))


def test_the_readme_tutorial_strategy_runs(tmp, shared_cache):
    blocks = tutorial_blocks()
    assert set(blocks) == {"my_strategy.py", "my_run.yaml", "notebook.py"}
    assert sum(1 for line in blocks["my_strategy.py"].splitlines() if line.strip()) <= 40  # "a new strategy in 40 lines"
    (tmp / "my_strategy.py").write_text(blocks["my_strategy.py"])
    # the README's files; the run shrunk to seconds (fewer images and epochs), everything else as written
    shrink = {"benchmark": {"train_per_class": 60, "test_per_class": 30}, "train": {"epochs": 2},
              "backbone": {"weights": {"pretrain": {"epochs": 1}}}, "progress": False, "cache_dir": str(shared_cache)}
    run_yaml = blocks["my_run.yaml"].replace("base: experiments/", f"base: {ROOT}/experiments/")
    (tmp / "my_run.yaml").write_text(run_yaml + yaml.safe_dump(shrink))
    data = yaml.safe_load((tmp / "my_run.yaml").read_text())
    assert data["strategy"] == {"name": "cosine_head", "lr": 0.05, "scale": 16.0} and data["plugins"] == ["./my_strategy.py"]
    out = run_cl("describe", "cosine_head", "--import", "./my_strategy.py", cwd=tmp)
    assert out.returncode == 0 and "scale" in out.stdout and "logit scale" in out.stdout, out.stderr
    out = run_cl("run", "my_run.yaml", cwd=tmp)
    assert out.returncode == 0, out.stderr
    metrics = json.loads((tmp / "runs" / "tutorial" / "cosine_head" / "seed0" / "metrics.json").read_text())
    assert metrics["trainable_params"] == 10 * 128  # the cosine head: 10 classes x the backbone's 128 features
    assert len(metrics["acc_matrix"]) == 4 and 0 <= metrics["final_acc"] <= 1
    # the notebook block, as a script in the same directory
    (tmp / "notebook.py").write_text(blocks["notebook.py"])
    out = subprocess.run([sys.executable, "notebook.py"], capture_output=True, text=True, cwd=tmp, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(Path("runs") / "tutorial" / "cosine_head,strategy.scale=32" / "seed0"))
    assert "'scale': 32.0" in out.stdout and re.search(r"[0-9a-f]{64}$", lines[-1])


def test_api_load_run_refuses_what_is_not_a_finished_run(tmp):
    from cl.api import load_config, load_run, run
    from cl.errors import UserError

    cfg = tiny_config(tmp)
    metrics = run(cfg, ["strategy.memory_size=12"])
    assert metrics["run_dir"].endswith("er,strategy.memory_size=12/seed0")
    finished = load_run(metrics["run_dir"])
    import numpy as np

    assert finished.acc_matrix.shape == (3, 3) and np.isnan(finished.acc_matrix[0, 1])
    assert finished.metrics["final_acc"] == metrics["final_acc"] and finished.config["strategy"]["memory_size"] == 12
    assert finished.log() and all(isinstance(entry, dict) for entry in finished.log())
    with pytest.raises(UserError, match="no such run directory"):
        load_run(tmp / "nowhere")
    with pytest.raises(UserError, match="not a run directory"):
        load_run(tmp)
    unfinished = load_config(cfg, ["seed=3"])
    from cl.engine.loop import run as run_loop

    assert run_loop(unfinished, stop_after=1) is None
    with pytest.raises(UserError, match="unfinished run"):
        load_run(unfinished.run_dir())
    with pytest.raises(UserError, match="already resolved"):
        load_config(unfinished, ["seed=1"])


def test_two_plugin_files_with_one_name_are_refused(tmp):
    (tmp / "a").mkdir()
    (tmp / "b").mkdir()
    first = write_plugin(tmp / "a" / "same.py", "same_a")
    second = write_plugin(tmp / "b" / "same.py", "same_b")
    cfg = write_yaml(tmp / "run.yaml", tiny_config(tmp, strategy={"name": "same_a"}))
    out = run_cl("run", str(cfg), "--import", str(first), "--import", str(second))
    assert out.returncode == 2 and "are both plugin files named same.py; rename one" in out.stderr, out.stderr
    assert not (tmp / "runs").exists()


def test_a_plugin_edited_between_a_run_and_its_resume_is_another_config(tmp):
    plugin = write_plugin(tmp / "ncm_edit.py", "ncm_edit")
    cfg = write_yaml(tmp / "run.yaml", tiny_config(tmp, strategy={"name": "ncm_edit"}, plugins=[str(plugin)]))
    out = run_cl("run", str(cfg), "--stop-after", "1")
    assert out.returncode == 0, out.stderr
    plugin.write_text(plugin.read_text().replace("(1 - self.cfg.shrink)", "0.5 * (1 - self.cfg.shrink)"))
    out = run_cl("run", str(cfg), "--resume")  # the rest would run other code than the first experience did
    assert out.returncode == 2 and "plugins" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp / "runs" / "tiny" / "ncm_edit" / "seed0" / "metrics.json").exists()


def test_plugin_input_mistakes_are_one_line(tmp):
    cfg = write_yaml(tmp / "run.yaml", tiny_config(tmp))
    (tmp / "plug.txt").write_text("x = 1\n")
    (tmp / "exits.py").write_text("import sys\nsys.exit(3)\n")
    for args, message in ((["--import", str(tmp / "plug.txt")], "is not a .py file"),
                          (["--import", str(tmp / "exits.py")], "failed to import: SystemExit: 3"),
                          (["--import", " "], "--import: an empty module name or path")):
        out = run_cl("run", str(cfg), *args)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, (args, out.stderr)
    as_string = write_yaml(tmp / "string.yaml", {**tiny_config(tmp), "plugins": "my.py"})
    out = run_cl("run", str(as_string))
    assert out.returncode == 2 and "plugins: expected a list of module names or .py files" in out.stderr, out.stderr
    assert not (tmp / "runs").exists()


def test_a_symlink_to_a_plugin_is_the_same_plugin(tmp):
    plugin = write_plugin(tmp / "ncm_link.py", "ncm_link")
    (tmp / "alias.py").symlink_to(plugin)
    cfg = write_yaml(tmp / "run.yaml", tiny_config(tmp, strategy={"name": "ncm_link"}, plugins=[str(plugin)]))
    assert main(["run", str(cfg), "--import", str(tmp / "alias.py")]) == 0  # imported once, not "registered twice"


def test_a_broken_installed_plugin_does_not_hide_a_typo(tmp):
    site = tmp / "site"
    fake_distribution(site, "brokenplug", "[cl.strategies]\nraising_ep = raising_module\n", {"raising_module": "raise RuntimeError('ep boom')\n"})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    cfg = write_yaml(tmp / "run.yaml", tiny_config(tmp))
    out = run_cl("run", str(cfg), "--set", "strategy.name=err", "--dry-run", env=env)
    assert out.returncode == 2 and "unknown strategy 'err'" in out.stderr and "raising_ep" in out.stderr, out.stderr
    out = run_cl("describe", "raising_ep", env=env)
    assert out.returncode == 2 and "failed to import raising_module: RuntimeError: ep boom" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_the_api_refuses_wrong_types_in_one_line(tmp):
    from cl.api import load_config, load_run
    from cl.errors import UserError

    cfg = tiny_config(tmp)
    for kwargs, message in (({"overrides": "strategy.lr=0.1"}, "overrides: expected a list of strings"),
                            ({"overrides": [1]}, "overrides: expected a list of strings"),
                            ({"plugins": "x.py"}, "plugins: expected a list of strings")):
        with pytest.raises(UserError, match=message):
            load_config(cfg, **kwargs)
    for base in (5, [5], {"a": 1}):
        with pytest.raises(UserError, match="'base' must be a path or a list of paths"):
            load_config({**cfg, "base": base})
    with pytest.raises(UserError, match="expected a run directory path"):
        load_run(None)  # type: ignore[arg-type]
    from cl.api import run

    metrics = run(cfg)
    path = Path(metrics["run_dir"])
    data = json.loads((path / "metrics.json").read_text())
    (path / "metrics.json").write_text(json.dumps({**data, "acc_matrix": "x"}))
    with pytest.raises(UserError, match="metrics.json: .*acc_matrix"):
        load_run(path)
