"""configs.Layout: the one parsed layout -- its rank map (the JAX mesh's device order), dp, world, labels -- and a
parse of the sources for anything else that indexes a mesh dict by an axis name."""

import ast
import dataclasses
from pathlib import Path

import pytest

from configs import MESH_AXES, ConfigError, Layout, load_config
from configs.cli import layout_label

ROOT = Path(__file__).resolve().parents[1]

MESHES = [  # (spec, devices for a -1 axis)
    ("data=1", None),
    ("data=2,fsdp=3", None),
    ("pipeline=2,data=3,fsdp=2,tensor=2", None),
    ("pipeline=3,tensor=4", None),
    ("data=2,fsdp=-1,tensor=2", 16),
    ("pipeline=-1,fsdp=2", 10),
]


@pytest.mark.parametrize("spec,n", MESHES)
def test_coords_rank_round_trip_for_every_rank(spec, n):
    lay = Layout.from_spec(spec, n)
    strides = {"tensor": 1, "fsdp": lay.tensor, "data": lay.tensor * lay.fsdp,
               "pipeline": lay.tensor * lay.fsdp * lay.data}
    seen = set()
    for r in range(lay.world):
        c = lay.coords(r)
        assert list(c) == list(MESH_AXES)
        assert all(0 <= c[a] < lay.mesh_shape()[a] for a in MESH_AXES)
        assert lay.rank(**c) == r
        assert sum(c[a] * strides[a] for a in MESH_AXES) == r  # tensor innermost, pipeline outermost
        assert lay.dp_rank(r) == c["data"] * lay.fsdp + c["fsdp"]
        assert lay.stage(r) == c["pipeline"]
        seen.add(tuple(c.values()))
    assert len(seen) == lay.world
    # every data-parallel rank holds the same number of global ranks (pipeline x tensor)
    counts = [sum(lay.dp_rank(r) == d for r in range(lay.world)) for d in range(lay.dp)]
    assert counts == [lay.pipeline * lay.tensor] * lay.dp


def test_sizes_dp_world_and_minus_one():
    lay = Layout.from_spec("data=2,fsdp=-1,tensor=2", 16)
    assert lay.sizes == (1, 2, 4, 2) and lay.mesh_shape() == {"pipeline": 1, "data": 2, "fsdp": 4, "tensor": 2}
    assert (lay.dp, lay.world) == (8, 16)
    big = Layout(pipeline=8, data=6, tensor=2, zero=1)
    assert (big.dp, big.world, big.spec) == (6, 96, "pipeline=8,data=6,tensor=2")
    assert Layout.from_spec(big.spec, zero=1) == big
    assert Layout().spec == "data=1" and Layout().world == 1
    assert [f.name for f in dataclasses.fields(Layout)][:4] == list(MESH_AXES)


def test_config_accessor_is_the_same_layout():
    cfg = load_config("tiny", {"parallel.mesh": "data=2,fsdp=2", "parallel.zero": 3, "parallel.hpz": True})
    assert cfg.layout() == Layout(data=2, fsdp=2, zero=3, hpz=True)
    assert cfg.dp_size() == 4 and cfg.global_batch() == cfg.parallel.mbs * cfg.parallel.gas * 4
    wild = load_config("tiny", {"parallel.mesh": "fsdp=-1"}, validate=False)
    assert wild.layout(8).fsdp == 8
    with pytest.raises(ConfigError, match="device count is unknown"):
        wild.layout()


@pytest.mark.parametrize("kwargs,label", [
    # the study's layouts at scale (compare/plan's families)
    (dict(pipeline=8, data=6, tensor=2, zero=1), "pp8+zero1+tp2"),
    (dict(data=8, fsdp=12, zero=3, hpz=True), "zero3+hpz"),
    (dict(data=8, fsdp=12, zero=3, mics=True), "zero3+mics"),
    (dict(data=16, tensor=6, zero=2), "zero2+tp6"),
    (dict(fsdp=96, zero=3), "zero3"),
    (dict(data=96, zero=1), "zero1"),
    (dict(pipeline=2, zero=1), "pp2+zero1"),
])
def test_labels(kwargs, label):
    assert Layout(**kwargs).label == label


def test_report_layouts_label_as_both_trainers_write_them(tmp_path):
    """The report's layouts: configs.Layout, layout_label and the torch reference give one label each."""
    from compare.report import LAYOUTS, run_config
    from torch_ref.layouts import plan_layout

    want = {"zero1": "zero1", "zero2": "zero2", "zero3": "zero3", "zero3-hpz": "zero3+hpz", "mics": "zero3+mics",
            "tp2": "zero1+tp2", "tp2-zero2": "zero2+tp2", "pp2-zero1": "pp2+zero1", "pp2v2-zero1": "pp2+zero1"}
    assert set(want) == set(LAYOUTS)
    for name, spec in LAYOUTS.items():
        assert spec.layout.label == want[name], name
        if not spec.default:  # a JAX option on a deeper model than the parity preset
            continue
        cfg = run_config("tiny", spec, "fp32", 2, tmp_path, "torch")
        torch_layout = plan_layout(cfg)
        assert spec.layout.label == layout_label(cfg) == torch_layout.label == want[name], name
        assert torch_layout.shape == cfg.layout()
        assert [torch_layout.dp_rank(r) for r in range(torch_layout.world_size)] == \
            [cfg.layout().dp_rank(r) for r in range(cfg.layout().world)]


def test_group_members_differ_only_along_its_axes():
    lay = Layout(pipeline=2, data=2, fsdp=3, tensor=2)
    assert lay.group(("data", "fsdp")) == (0, 2, 4, 6, 8, 10)
    assert lay.group(("tensor",), rank=5) == (4, 5)
    for rank in range(lay.world):
        for axes in (("tensor",), ("data", "fsdp"), ("pipeline",), ("fsdp",)):
            members = lay.group(axes, rank)
            assert rank in members and len(members) == lay.world // lay.replace(
                **{a: 1 for a in axes}).world  # the product of the axes' sizes
            c0 = lay.coords(rank)
            for m in members:
                c = lay.coords(m)
                assert all(c[a] == c0[a] for a in MESH_AXES if a not in axes)


def test_bad_input_names_the_value():
    with pytest.raises(ConfigError, match="fsdp=0"):
        Layout(fsdp=0)
    lay = Layout(data=2, tensor=2)
    with pytest.raises(ConfigError, match="rank 4 is outside"):
        lay.coords(4)
    with pytest.raises(ConfigError, match="tensor=2 is outside"):
        lay.rank(tensor=2)
    with pytest.raises(ConfigError, match="unknown mesh axes"):
        lay.rank(tp=1)
    with pytest.raises(ConfigError, match="unknown mesh axes"):
        Layout.from_shape({"dp": 2})


@pytest.mark.parametrize("spec", ["data=2,fsdp=2,tensor=2", "pipeline=2,fsdp=4", "pipeline=2,data=2,tensor=2",
                                  "fsdp=-1"])
def test_rank_map_is_the_jax_mesh_device_order(spec):
    """The device at a rank's coordinates in the JAX mesh is that rank's device: torch_ref's ranks and JAX's
    devices hold the same shards."""
    import jax
    from jax.sharding import AxisType

    from jax_impl.sharding import dp_size, make_mesh

    devices = jax.devices()
    lay = Layout.from_spec(spec, len(devices))
    meshes = [jax.make_mesh(lay.sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                            devices=devices[:lay.world]),
              make_mesh(lay.mesh_shape(), devices)]
    for mesh in meshes:
        assert dict(mesh.shape) == lay.mesh_shape() and dp_size(mesh) == lay.dp
        for r in range(lay.world):
            c = lay.coords(r)
            assert mesh.devices[tuple(c[a] for a in mesh.axis_names)] == devices[r]


# ----------------------------------------------------------------------------- no second reading of the mesh
SOURCES = ("aurora_data", "benchmarks", "compare", "configs", "jax_impl", "runtime", "scripts", "torch_ref",
           "weightmap")
# modules that may index a mesh dict by an axis name, and why
ALLOWED = {
    "configs/layout.py": "defines the layout: the rank map over the axes",
    "configs/schema.py": "parse_mesh builds the axis -> size dict the Layout is made from; validate_config's "
                         "checks read that dict",
    "jax_impl/sharding.py": "the JAX logical-axis rules and mesh construction",
}


def axis_indexing(source: str) -> list[tuple[int, str]]:
    """(line, text) of every ``x["<axis>"]`` and ``x.get("<axis>", ...)`` in ``source``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        key = None
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            key = node.slice.value
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop")
              and node.args and isinstance(node.args[0], ast.Constant)):
            key = node.args[0].value
        if key in MESH_AXES:
            out.append((node.lineno, ast.unparse(node)))
    return sorted(out)


def test_axis_indexing_finder_finds_what_it_looks_for():
    src = 'dp = m["data"] * shape.get("fsdp", 1)\nx = cfg["model"]\ny = d.get("tensor")\n'
    assert sorted(line for line, _ in axis_indexing(src)) == [1, 1, 3]


def test_no_module_indexes_a_mesh_by_axis_name():
    found = []
    for pkg in SOURCES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in ALLOWED:
                found += [f"{rel}:{line}: {text}" for line, text in axis_indexing(path.read_text())]
    assert not found, ("read mesh sizes from configs.Layout (cfg.layout(): .pipeline, .dp, .coords(rank), ...), "
                       "not a dict indexed by axis name:\n" + "\n".join(found))
    for rel in ALLOWED:
        assert (ROOT / rel).exists(), rel
