"""docs/plugins.md stays true: hook signatures match the source, and the examples run.

* Every hook specification of :mod:`harness.hookspecs` appears in the guide under its own heading,
  with its signature line exactly as written in the source (derived here with ``ast``, never
  hard-coded).
* The code blocks marked ``<!-- example: NAME -->`` are executed in a fresh module namespace,
  registered with a fresh plugin manager (``extra_plugins``), built by name through the registry
  and checked numerically (the worked normalizer gives the same numbers in both step modes).
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import re
import textwrap
import tomllib
import types
from pathlib import Path

import pytest
import torch

from harness import hookimpl, hookspecs
from harness.matrix import expand
from harness.registry import build_registry, get_plugin_manager, register_observers
from harness.snn import LayerFactory, LIFNeuron, SequenceModule, begin_sequence, end_sequence, run_sequence, set_step_mode

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
REPO = DOC.parents[1]
BOTH = frozenset({"single", "sequence"})

# ---------------------------------------------------------------------------------------------
# Reading the guide
# ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
_MARKED = re.compile(
    r"<!--\s*example:\s*(?P<name>[\w-]+)\s*-->[ \t]*\n(?:[ \t]*\n)*```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```[ \t]*$",
    re.M | re.S,
)


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def code_blocks(text: str, lang: str) -> list[str]:
    return [m["body"] for m in _FENCE.finditer(text) if m["lang"] == lang]


def example_blocks(text: str, name: str, lang: str = "python") -> list[str]:
    """The fenced blocks right after ``<!-- example: name -->``, in order."""
    blocks = [m for m in _MARKED.finditer(text) if m["name"] == name]
    assert blocks, f"{DOC.name}: no code block marked <!-- example: {name} -->"
    for m in blocks:
        assert m["lang"] == lang, f"{DOC.name}: block <!-- example: {name} --> is {m['lang']!r}, expected {lang!r}"
    return [m["body"] for m in blocks]


def load_example(text: str, name: str) -> types.ModuleType:
    """Execute the marked python block(s) in a fresh module: it is the plugin object."""
    module = types.ModuleType(f"docs_example_{name.replace('-', '_')}")
    module.__file__ = str(DOC)
    code = "\n\n".join(example_blocks(text, name))
    exec(compile(code, f"{DOC}:<example {name}>", "exec"), module.__dict__)
    return module


def registry_with(plugin: types.ModuleType, plugin_name: str):
    """A fresh plugin manager (built-ins + ``plugin``) and its registry."""
    pm = get_plugin_manager(autoload=False, extra_plugins=[(plugin, plugin_name)])
    return pm, build_registry(pm)


def only_component(registry, kind: str, plugin_name: str) -> str:
    names = [n for n in registry.names(kind) if registry.info(kind, n).plugin == plugin_name]
    assert len(names) == 1, f"plugin {plugin_name!r} should register exactly one {kind}, got {names}"
    return names[0]


# ---------------------------------------------------------------------------------------------
# (a) hook signatures, derived from the source
# ---------------------------------------------------------------------------------------------


def hookspec_functions() -> dict[str, types.FunctionType]:
    """Every function of harness.hookspecs carrying pluggy's spec marker (``snn_harness_spec``)."""
    marker = f"{hookspecs.PROJECT_NAME}_spec"
    return {
        name: obj
        for name, obj in vars(hookspecs).items()
        if inspect.isfunction(obj) and getattr(obj, marker, None) is not None
    }


def signature_line(func: types.FunctionType) -> str:
    """``def name(params as written in the source) -> ann``, on one line, from the source text."""
    src = textwrap.dedent(inspect.getsource(func))
    node = ast.parse(src).body[0]
    assert isinstance(node, ast.FunctionDef) and node.name == func.__name__
    assert node.returns is not None, f"hookspec {func.__name__} has no return annotation"
    lines = src.splitlines(keepends=True)

    def offset(lineno: int, col: int) -> int:
        return sum(len(l) for l in lines[: lineno - 1]) + col

    text = src[offset(node.lineno, node.col_offset) : offset(node.returns.end_lineno, node.returns.end_col_offset)]
    text = re.sub(r"\s+", " ", text)  # a signature written over several lines -> one line
    text = re.sub(r"\(\s+", "(", text)
    text = re.sub(r",?\s+\)", ")", text)  # trailing comma of a multi-line parameter list
    # sanity: the text names exactly the parameters Python sees
    params = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
    assert params == list(inspect.signature(func).parameters), text
    return text


def expected_signatures() -> dict[str, str]:
    return {name: signature_line(func) for name, func in hookspec_functions().items()}


def problems_in(text: str) -> list[str]:
    """What the guide gets wrong about the hooks: missing signature lines or headings."""
    code_lines = {line.strip() for block in code_blocks(text, "python") for line in block.splitlines()}
    problems = []
    for name, sig in expected_signatures().items():
        if sig not in code_lines:
            problems.append(f"no python code line `{sig}`")
        if not re.search(rf"^#{{2,6}} .*\b{re.escape(name)}\b", text, re.M):
            problems.append(f"no heading for hook {name}")
    return problems


def test_hookspecs_are_found_by_marker_and_by_source() -> None:
    by_marker = set(hookspec_functions())
    tree = ast.parse(inspect.getsource(hookspecs))
    by_source = {
        n.name
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and any(
            (d.func if isinstance(d, ast.Call) else d).__dict__.get("id") == "hookspec" for d in n.decorator_list  # @hookspec(...) too
        )
    }
    assert by_marker, "no hook specification found in harness.hookspecs"
    assert by_marker == by_source


def test_every_hook_signature_is_documented_exactly(doc: str) -> None:
    assert problems_in(doc) == []


def _drift_rename_first_param(sig: str) -> str:
    return re.sub(r"\((\w+)", r"(\1_renamed", sig, count=1)


def _drift_first_annotation(sig: str) -> str:
    return re.sub(r"\((\w+): ([^,)]+)", r"(\1: object", sig, count=1)


@pytest.mark.parametrize("drift", [_drift_rename_first_param, _drift_first_annotation])
def test_the_check_fails_when_a_documented_signature_drifts(doc: str, drift) -> None:
    # Edit a copy of the guide in memory, one hook at a time: each drift must be reported.
    for name, sig in expected_signatures().items():
        drifted = drift(sig)
        assert drifted != sig
        text = "\n".join(drifted if line.strip() == sig else line for line in doc.splitlines())
        assert problems_in(text) == [f"no python code line `{sig}`"], name


# ---------------------------------------------------------------------------------------------
# (b) the worked-example normalizer
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worked(doc: str):
    plugin = load_example(doc, "worked-normalizer")
    pm, registry = registry_with(plugin, "worked_example")
    return plugin, registry, only_component(registry, "normalizer", "worked_example")


def test_worked_normalizer_registers_with_both_step_modes(worked) -> None:
    _, registry, name = worked
    info = registry.info("normalizer", name)
    assert info.step_modes == BOTH
    assert "num_features" not in info.options  # injected, not a user option
    assert all(not o.required for o in info.options.values())
    assert info.description


def _run(module: torch.nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    set_step_mode(module, mode)
    begin_sequence(module, x.shape[0])
    if mode == "sequence":
        y = module(x)
    else:
        y = torch.stack([module(x[t]) for t in range(x.shape[0])])
    end_sequence(module)
    return y


@pytest.mark.parametrize("shape", [(4, 8, 3, 5, 5), (4, 8, 3)], ids=["conv", "linear"])
def test_worked_normalizer_gives_the_same_numbers_in_both_step_modes(worked, shape) -> None:
    _, registry, name = worked
    torch.manual_seed(0)
    T, B, C = shape[:3]
    seq = registry.normalizers[name](num_features=C).double()
    one = registry.normalizers[name](num_features=C).double()
    assert isinstance(seq, SequenceModule)
    with torch.no_grad():  # non-trivial affine parameters, identical in both copies
        for p in seq.parameters():
            p.copy_(torch.randn_like(p))
    one.load_state_dict(seq.state_dict())
    initial = {k: v.clone() for k, v in seq.state_dict().items()}

    for _ in range(2):  # two sequences: per-sequence state must be reset in between
        x = (torch.randn(*shape, dtype=torch.float64) * 2 + 3).requires_grad_(True)
        x1 = x.detach().clone().requires_grad_(True)
        seq.train(), one.train()
        y_seq, y_one = _run(seq, x, "sequence"), _run(one, x1, "single")
        assert y_seq.shape == x.shape
        torch.testing.assert_close(y_seq, y_one)
        w = torch.randn_like(y_seq)
        (y_seq * w).sum().backward()
        (y_one * w).sum().backward()
        torch.testing.assert_close(x.grad, x1.grad)
        for p, q in zip(seq.parameters(), one.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        for k, v in seq.state_dict().items():  # running statistics updated identically
            torch.testing.assert_close(v, one.state_dict()[k], msg=k)

    assert any(not torch.equal(v, initial[k]) for k, v in seq.state_dict().items() if k not in dict(seq.named_parameters())), (
        "end_sequence should update the running statistics in training mode"
    )

    seq.eval(), one.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(_run(seq, x, "sequence"), _run(one, x, "single"))


def test_worked_normalizer_normalizes_each_step_separately(worked) -> None:
    _, registry, name = worked
    bn = registry.normalizers[name](num_features=3).double().train()
    shift = torch.arange(4, dtype=torch.float64).view(4, 1, 1, 1, 1) * 10  # a different mean per step
    x = torch.randn(4, 8, 3, 5, 5, dtype=torch.float64) + shift
    y = _run(bn, x, "sequence")  # fresh module: identity affine
    torch.testing.assert_close(y.mean(dim=(1, 3, 4)), torch.zeros(4, 3, dtype=torch.float64))


def test_worked_normalizer_in_a_model_matches_across_step_modes(worked) -> None:
    _, registry, name = worked
    torch.manual_seed(0)
    layers = LayerFactory(
        normalizer=lambda c: registry.normalizers[name](num_features=c),
        neuron=lambda: LIFNeuron(registry.thresholds["fixed"]()),
    )
    model = registry.models["vgg_small"](in_channels=1, num_classes=10, input_size=(8, 8), layers=layers, channels=[4, 8])
    model = model.double().train()
    x = torch.randn(3, 5, 1, 8, 8, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out_seq = run_sequence(model, x, "sequence")
    after_seq = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    out_one = run_sequence(model, x, "single")
    assert out_seq.shape == (3, 5, 10)
    torch.testing.assert_close(out_seq, out_one)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, after_seq[k], msg=k)


def test_worked_quick_check_runs(doc: str) -> None:
    """The short both-modes check shown after the module runs as written."""
    plugin = load_example(doc, "worked-normalizer")
    (check,) = example_blocks(doc, "worked-check")
    torch.manual_seed(0)
    exec(compile(check, f"{DOC}:<example worked-check>", "exec"), plugin.__dict__)


def test_worked_pyproject_declares_the_entry_point(doc: str) -> None:
    (text,) = example_blocks(doc, "worked-pyproject", "toml")
    data = tomllib.loads(text)
    entry_points = data["project"]["entry-points"][hookspecs.PROJECT_NAME]
    assert len(entry_points) == 1
    (module,) = entry_points.values()
    assert module in data["tool"]["setuptools"]["py-modules"]


def test_worked_matrix_expands_against_the_registry(doc: str, worked) -> None:
    _, registry, name = worked
    (text,) = example_blocks(doc, "worked-matrix", "toml")
    data = tomllib.loads(text)
    matrix = expand(data, registry, source="meanbn.toml")
    assert not matrix.skipped
    assert len(matrix.cells) == math.prod(len(v) for v in matrix.axes.values())
    assert {c.config.normalizer.name for c in matrix.cells} == {"vanilla_bn", name}


# ---------------------------------------------------------------------------------------------
# (c) the other examples
# ---------------------------------------------------------------------------------------------


def test_threshold_policy_example(doc: str) -> None:
    plugin = load_example(doc, "threshold-policy")
    _, registry = registry_with(plugin, "worked_threshold")
    name = only_component(registry, "threshold", "worked_threshold")
    info = registry.info("threshold", name)
    assert info.step_modes == BOTH
    defaults = info.defaults()

    T = 5
    policy = registry.thresholds[name]()
    neuron = LIFNeuron(policy)
    begin_sequence(neuron, T)  # the walker reaches the policy inside the neuron
    assert policy.time_steps == T
    u = torch.zeros(2, 3)
    assert float(policy(u, 0)) == pytest.approx(defaults["start"])
    assert float(policy(u, T - 1)) == pytest.approx(defaults["end"])
    end_sequence(neuron)

    torch.manual_seed(0)
    x = torch.rand(T, 16, 4, dtype=torch.float64)
    a = LIFNeuron(registry.thresholds[name]())
    b = LIFNeuron(registry.thresholds[name]())
    torch.testing.assert_close(_run(a, x, "sequence"), _run(b, x, "single"))


def test_observer_example(doc: str, tmp_path: Path) -> None:
    plugin = load_example(doc, "observer")
    pm = get_plugin_manager(autoload=False, extra_plugins=[(plugin, "worked_observer")])
    register_observers(pm)
    ours = [p for p in pm.get_plugins() if type(p).__module__ == plugin.__name__]
    assert len(ours) == 1, "the example should register one observer"
    (observer,) = ours
    assert pm.get_name(observer).startswith("worked_observer.")
    # Every @hookimpl method names a real hook (register_observers would refuse it otherwise).
    for _, impl in inspect.getmembers(type(observer)):
        if getattr(impl, f"{hookspecs.PROJECT_NAME}_impl", None) is not None:
            assert impl.__name__ in hookspec_functions(), impl.__name__

    others = [p for p in pm.get_plugins() if p is not observer]

    def hook(name: str):
        return pm.subset_hook_caller(name, remove_plugins=others)

    run = types.SimpleNamespace(output_dir=tmp_path, matrix=types.SimpleNamespace(name="m"))
    cell = types.SimpleNamespace(id="abc123", label="normalizer=vanilla_bn")
    hook("on_matrix_start")(run=run)
    for epoch in (1, 2):
        hook("on_epoch_end")(cell=cell, epoch=epoch, metrics={"train_loss": 1.0 / epoch, "test_top1": 0.5})
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] == 0.5 and rows[0]["cell"] == "abc123"


def _tiny_model(registry, normalizer: str = "vanilla_bn"):
    layers = LayerFactory(
        normalizer=lambda c: registry.normalizers[normalizer](num_features=c),
        neuron=lambda: LIFNeuron(registry.thresholds["fixed"](theta=0.5)),
    )
    return registry.models["vgg_small"](in_channels=1, num_classes=10, input_size=(8, 8), layers=layers, channels=[4, 8])


def test_online_trainer_and_loss_example(doc: str) -> None:
    plugin = load_example(doc, "online-trainer")
    _, registry = registry_with(plugin, "worked_trainer")
    trainer_name = only_component(registry, "trainer", "worked_trainer")
    loss_name = only_component(registry, "loss", "worked_trainer")
    assert registry.info("trainer", trainer_name).step_modes == frozenset({"single"})

    torch.manual_seed(0)
    model = _tiny_model(registry)
    trainer = registry.trainers[trainer_name]()
    loss_fn = registry.losses[loss_name]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs = torch.rand(8, 1, 8, 8).unsqueeze(0).expand(3, 8, 1, 8, 8)  # like harness.data.to_sequence
    target = torch.randint(0, 10, (8,))

    logits = torch.randn(3, 8, 10)
    torch.testing.assert_close(loss_fn(logits, target), torch.stack([loss_fn.step(logits[t], target) for t in range(3)]).mean())

    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train_batch(model, inputs, target, loss_fn, optimizer)
    assert result.count == 8 and 0 <= int(result.correct) <= 8
    assert torch.isfinite(result.loss) and not result.loss.requires_grad
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before)), "the optimizer step changed nothing"
    result = trainer.eval_batch(model, inputs, target, loss_fn)
    assert torch.isfinite(result.loss) and result.count == 8


def test_documented_skip_reason_is_what_the_matrix_says(doc: str) -> None:
    """Section 3.5 quotes the skip reason of a sequence-only normalizer with the online trainer."""
    plugin = types.ModuleType("nothing_extra")  # the built-in tdbn and online trainer suffice
    _, registry = registry_with(plugin, "nothing_extra")
    data = {
        "defaults": {"dataset": "digits", "model": "vgg_small", "normalizer": "vanilla_bn", "trainer": "bptt",
                     "epochs": 1, "batch_size": 8, "time_steps": 2},
        "matrix": {"normalizer": ["vanilla_bn", "tdbn"], "trainer": ["bptt", "online"]},
    }
    matrix = expand(data, registry, source="bench.toml")
    assert [c.label for c in matrix.skipped] == ["normalizer=tdbn trainer=online"]
    assert f"[normalizer=tdbn trainer=online]  {matrix.skipped[0].skip_reason}" in doc


def test_model_example(doc: str) -> None:
    plugin = load_example(doc, "model")
    _, registry = registry_with(plugin, "worked_model")
    name = only_component(registry, "model", "worked_model")
    info = registry.info("model", name)
    assert not {"in_channels", "num_classes", "input_size", "layers"} & set(info.options)

    torch.manual_seed(0)
    layers = LayerFactory(
        normalizer=lambda c: registry.normalizers["vanilla_bn"](num_features=c),
        neuron=lambda: LIFNeuron(registry.thresholds["fixed"]()),
    )
    model = registry.models[name](in_channels=2, num_classes=7, input_size=(4, 5), layers=layers).double()
    x = torch.randn(3, 6, 2, 4, 5, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out_seq = run_sequence(model, x, "sequence")
    model.load_state_dict(state)
    out_one = run_sequence(model, x, "single")
    assert out_seq.shape == (3, 6, 7)
    torch.testing.assert_close(out_seq, out_one)


def test_method_citations_point_to_sections_of_the_projects_own_notes() -> None:
    """Code cites docs/method.md by section; every cited section exists, and nothing cites a method
    sheet the repository does not hold."""
    import re

    notes = (REPO / "docs" / "method.md").read_text()
    sections = {int(n) for n in re.findall(r"^## (\d+)\. ", notes, re.M)}
    assert sections == set(range(1, 11))
    cited: dict[str, set[int]] = {}
    for path in [*REPO.glob("harness/**/*.py"), *REPO.glob("plugins/*.py"), *REPO.glob("tests/*.py"),
                 *REPO.glob("benchmarks/*.toml"), *REPO.glob("benchmarks/*.py"), REPO / "README.md", REPO / "docs" / "plugins.md"]:
        text = path.read_text()
        assert "METHOD" + ".md" not in text, f"{path} cites a file the repository does not hold"
        for m in re.finditer(r"docs/method\.md\s+sections?\s+(\d+)(?:\s+and\s+(\d+))?", text):
            cited.setdefault(str(path.relative_to(REPO)), set()).update(int(g) for g in m.groups() if g)
    assert cited, "no citation of docs/method.md found"
    missing = {p: n - sections for p, n in cited.items() if n - sections}
    assert not missing, f"citations of sections docs/method.md does not have: {missing}"


def test_the_changelog_names_the_plugin_api_version_and_every_hook() -> None:
    import harness

    changelog = (Path(__file__).resolve().parents[1] / "CHANGELOG.md").read_text()
    assert f"plugin API {harness.API_VERSION}" in changelog and f'SNN_HARNESS_API = "{harness.API_VERSION}"' in changelog
    missing = [name for name in hookspec_functions() if f"`{name}`" not in changelog]
    assert not missing, f"CHANGELOG.md does not list the hooks {missing}"
