"""Topology files: the bundled machines, the graph queries the simulator relies on, and the
messages a user gets for a broken file (each must name the file and the field path)."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from zoplan.errors import ZoplanError
from zoplan.topology import Machine, bundled_names, load_topology, resolve_topology_path
from zoplan.topology.view import render_topology, topology_rows, topology_table

BUNDLED = ["cpu-local", "dgx-a100", "dgx-h100", "h100-pcie-1x", "hgx-h200", "l40s-8x", "rtx4090-4x"]


# ----- bundled topologies -------------------------------------------------------------------------
def test_bundled_names_lists_every_shipped_file() -> None:
    assert bundled_names() == BUNDLED


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_topology_loads_and_every_gpu_reaches_host_memory(name: str) -> None:
    machine = load_topology(name)
    assert machine.name == name  # the file's name: field matches the name users type
    sockets = {s.id for s in machine.spec.sockets}
    for gpu in machine.gpus:
        path = machine.host_path(gpu)
        assert path, f"{gpu} has an empty host path"
        assert path[0].split("->")[0] in sockets and path[-1].endswith(f"->{gpu}")
        assert machine.gpu_model(gpu).memory_gib > 0
        # Every bundled GPU model carries the assumed/measured 0.80 matmul efficiency
        # (docs/hardware-sources.md); CPU ranks carry achieved (measured) rates, so their
        # efficiency is 1.
        expected = 1.0 if machine.gpu_model(gpu).kind == "cpu" else 0.80
        assert machine.gpu_model(gpu).matmul_efficiency == pytest.approx(expected)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_topology_is_documented_with_comments(name: str) -> None:
    # Every number needs its public source next to it; at the least the file must carry comments.
    text = resolve_topology_path(name).read_text(encoding="utf-8")
    comment_lines = [line for line in text.splitlines() if line.lstrip().startswith("#")]
    assert len(comment_lines) >= 5


def test_hash_is_stable_and_follows_content(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    original = load_topology("dgx-a100").hash
    data = yaml.safe_load(resolve_topology_path("dgx-a100").read_text(encoding="utf-8"))
    # the same content without its comments and with the keys in another order: the same machine
    same = tmp_path / "same.yaml"
    same.write_text(yaml.safe_dump(dict(reversed(list(data.items()))), sort_keys=False), encoding="utf-8")
    assert load_topology(same).hash == original
    # another process with another string-hash seed computes it the same
    code = "from zoplan.topology import load_topology; print(load_topology('dgx-a100').hash)"
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert other.stdout.strip() == original
    data["links"][0]["gbps"] = 24
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert load_topology(changed).hash != load_topology("dgx-a100").hash


# ----- graph queries ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dgx_a100() -> Machine:
    return load_topology("dgx-a100")


def test_dgx_a100_host_path_goes_socket_switch_gpu(dgx_a100: Machine) -> None:
    assert dgx_a100.host_path("gpu0") == ["cpu0->pcie0", "pcie0->gpu0"]
    assert dgx_a100.host_path("gpu0", "d2h") == ["gpu0->pcie0", "pcie0->cpu0"]
    assert dgx_a100.host_path("gpu5") == ["cpu1->pcie2", "pcie2->gpu5"]
    assert dgx_a100.host_socket("gpu3") == "cpu0"
    assert dgx_a100.host_socket("gpu4") == "cpu1"
    assert dgx_a100.path_gbps(dgx_a100.host_path("gpu0")) == pytest.approx(25)


def test_dgx_a100_gpus_under_one_switch_share_their_uplink(dgx_a100: Machine) -> None:
    shared = Machine.shared_links(dgx_a100.host_path("gpu0"), dgx_a100.host_path("gpu1"))
    assert shared == ["cpu0->pcie0"]
    assert dgx_a100.uplink_group("gpu0") == dgx_a100.uplink_group("gpu1") == "cpu0->pcie0"


def test_dgx_a100_gpus_under_different_switches_share_nothing(dgx_a100: Machine) -> None:
    # Same socket, different switch: separate uplinks (host memory bandwidth is shared elsewhere).
    assert Machine.shared_links(dgx_a100.host_path("gpu0"), dgx_a100.host_path("gpu2")) == []
    assert dgx_a100.uplink_group("gpu0") != dgx_a100.uplink_group("gpu2")
    assert Machine.shared_links(dgx_a100.host_path("gpu0"), dgx_a100.host_path("gpu7")) == []


def test_dgx_h100_every_gpu_has_its_own_uplink() -> None:
    machine = load_topology("dgx-h100")
    groups = [machine.uplink_group(g) for g in machine.gpus]
    assert len(set(groups)) == len(machine.gpus)
    # H2D and D2H differ on Gen5 (55 vs 47 GB/s): the direction convention must survive loading.
    assert machine.path_gbps(machine.host_path("gpu0", "h2d")) == pytest.approx(55)
    assert machine.path_gbps(machine.host_path("gpu0", "d2h")) == pytest.approx(47)


def test_dgx_a100_peer_path_uses_nvlink(dgx_a100: Machine) -> None:
    path = dgx_a100.peer_path("gpu0", "gpu1")
    assert path == ["gpu0->nvswitch", "nvswitch->gpu1"]
    assert all(dgx_a100.directed[link].kind == "nvlink" for link in path)
    assert dgx_a100.path_gbps(path) == pytest.approx(200)
    assert dgx_a100.has_nvlink(dgx_a100.gpus)
    # Cross-socket pairs also go over NVLink, never through the CPUs.
    assert all(dgx_a100.directed[link].kind == "nvlink" for link in dgx_a100.peer_path("gpu0", "gpu7"))


def test_l40s_peer_paths_stay_on_pcie_and_cross_sockets() -> None:
    machine = load_topology("l40s-8x")
    assert not machine.has_nvlink(machine.gpus)
    assert not machine.has_nvlink(["gpu0", "gpu1"])
    same_switch = machine.peer_path("gpu0", "gpu1")
    assert same_switch == ["gpu0->pcie0", "pcie0->gpu1"]
    cross = machine.peer_path("gpu0", "gpu4")
    assert "cpu0->cpu1" in cross
    assert {machine.directed[link].kind for link in cross} == {"pcie", "socket"}
    assert machine.path_gbps(cross) == pytest.approx(25)


def test_rtx4090_workstation_has_no_switch_and_asymmetric_pcie() -> None:
    machine = load_topology("rtx4090-4x")
    assert machine.host_path("gpu2") == ["cpu0->gpu2"]
    assert machine.path_gbps(machine.host_path("gpu2", "h2d")) == pytest.approx(25.6)
    assert machine.path_gbps(machine.host_path("gpu2", "d2h")) == pytest.approx(26.8)
    assert not machine.has_nvlink(machine.gpus)


def test_cpu_local_has_cpu_ranks_on_host_memory() -> None:
    machine = load_topology("cpu-local")
    assert machine.gpus == ["rank0", "rank1"]
    assert all(machine.gpu_model(g).kind == "cpu" for g in machine.gpus)
    assert machine.host_path("rank1") == ["cpu0->rank1"]
    # the two ranks exchange through the socket, not over any GPU link
    assert machine.peer_path("rank0", "rank1") == ["rank0->cpu0", "cpu0->rank1"]
    assert machine.host_memory_bytes == pytest.approx(23.5 * 2**30)


# ----- bad files ------------------------------------------------------------------------------------
def _valid() -> dict[str, Any]:
    """Two GPUs under one switch on one socket: the smallest file that exercises every section."""
    return {
        "version": 1,
        "name": "tiny",
        "gpu_models": {"h100": {"memory_gib": 80, "tflops": {"bf16": 989}, "hbm_gbps": 3350}},
        "sockets": [{"id": "cpu0", "memory_gib": 512, "memory_gbps": 240}],
        "switches": [{"id": "sw0", "kind": "pcie"}],
        "gpus": [{"id": "gpu0", "model": "h100"}, {"id": "gpu1", "model": "h100"}],
        "links": [
            {"a": "cpu0", "b": "sw0", "kind": "pcie", "gbps": 25},
            {"a": "sw0", "b": "gpu0", "kind": "pcie", "gbps": 25},
            {"a": "sw0", "b": "gpu1", "kind": "pcie", "gbps": 25},
        ],
    }


def _write(tmp_path: Path, data: dict[str, Any] | str, name: str = "topo.yaml") -> Path:
    path = tmp_path / name
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path) -> str:
    with pytest.raises(ZoplanError) as info:
        load_topology(path)
    message = str(info.value)
    assert str(path) in message, f"message does not name the file: {message}"
    return message


def test_minimal_file_loads(tmp_path: Path) -> None:
    machine = load_topology(_write(tmp_path, _valid()))
    assert machine.gpus == ["gpu0", "gpu1"]
    assert machine.shared_links(machine.host_path("gpu0"), machine.host_path("gpu1")) == ["cpu0->sw0"]


def test_unknown_key_names_its_path(tmp_path: Path) -> None:
    data = _valid()
    data["gpus"][0]["colour"] = "green"
    assert "gpus.0.colour" in _error(_write(tmp_path, data))


def test_missing_version(tmp_path: Path) -> None:
    data = _valid()
    del data["version"]
    assert "missing 'version'" in _error(_write(tmp_path, data))


def test_unsupported_version(tmp_path: Path) -> None:
    data = _valid()
    data["version"] = 2
    message = _error(_write(tmp_path, data))
    assert "version 2 is not supported" in message


@pytest.mark.parametrize("gbps", [0, -5])
def test_non_positive_bandwidth(tmp_path: Path, gbps: float) -> None:
    data = _valid()
    data["links"][1]["gbps"] = gbps
    message = _error(_write(tmp_path, data))
    assert "links.1.gbps" in message and "greater than or equal to 0.001" in message


@pytest.mark.parametrize(
    "where,value",
    [
        ("gpu_models.h100.hbm_gbps", 1e-300),
        ("gpu_models.h100.tflops.bf16", 1e-300),
        ("gpu_models.h100.tflops.bf16", 1e300),
        ("sockets.0.memory_gbps", 1e-300),
        ("links.1.gbps", 1e300),
        ("links.1.gbps_back", 1e-9),
        ("network.gbps", 1e-300),
        ("price_per_hour_usd", 1e300),
    ],
)
def test_a_rate_no_machine_has_is_refused(tmp_path: Path, where: str, value: float) -> None:
    """1e-300 GB/s of memory bandwidth, written by hand, planned exit 0 a step of 300 digits."""
    data = _valid()
    data["network"] = {"gbps": 12.5}
    load_topology(_write(tmp_path, data, "good.yaml"))  # as it was
    *path, last = where.split(".")
    node: Any = data
    for key in path:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    assert where in _error(_write(tmp_path, data))


def test_non_positive_socket_bandwidth(tmp_path: Path) -> None:
    data = _valid()
    data["sockets"][0]["memory_gbps"] = 0
    assert "sockets.0.memory_gbps" in _error(_write(tmp_path, data))


def test_link_to_unknown_id(tmp_path: Path) -> None:
    data = _valid()
    data["links"][2]["b"] = "gpu9"
    message = _error(_write(tmp_path, data))
    assert "links.2" in message and "'gpu9'" in message


def test_gpu_without_pcie_path_to_host(tmp_path: Path) -> None:
    data = _valid()
    # gpu1 only reaches the world over NVLink: it can never be fed from host memory.
    data["switches"].append({"id": "nvs", "kind": "nvswitch"})
    data["links"][2] = {"a": "gpu1", "b": "nvs", "kind": "nvlink", "gbps": 200}
    data["links"].append({"a": "gpu0", "b": "nvs", "kind": "nvlink", "gbps": 200})
    message = _error(_write(tmp_path, data))
    assert "gpus.1" in message and "'gpu1'" in message and "no PCIe path" in message


def test_a_gpu_reached_only_through_another_gpu_has_no_host_path(tmp_path: Path) -> None:
    """A device is an end of PCIe, not a switch: a GPU whose only PCIe link goes to another GPU
    was planned as if fed through it."""
    data = _valid()
    data["links"][2] = {"a": "gpu1", "b": "gpu0", "kind": "pcie", "gbps": 25}
    message = _error(_write(tmp_path, data))
    assert "gpus.1" in message and "'gpu1'" in message and "no PCIe path" in message


def test_a_key_given_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    """YAML keeps the later of two equal keys without a word: a second `gpus:` block dropped the
    first one's GPUs. Every file zoplan reads (topologies, plans, profiles) goes through this."""
    text = yaml.safe_dump(_valid(), sort_keys=False)
    text = text.replace("gpus:", "gpus:\n- {id: gpuZ, model: h100}\ngpus:", 1)
    message = _error(_write(tmp_path, text))
    assert "the key 'gpus' is given twice in one mapping" in message and "at line" in message
    # a merge key's values may be overridden: that is what it is for
    merged = "base: &b {gbps: 25, kind: pcie}\n" + yaml.safe_dump(_valid(), sort_keys=False)
    merged = merged.replace(
        "- a: cpu0\n  b: sw0\n  kind: pcie\n  gbps: 25", "- <<: *b\n  a: cpu0\n  b: sw0\n  gbps: 25"
    )
    from zoplan.fileio import parse_yaml

    assert parse_yaml(merged)["links"][0] == {"a": "cpu0", "b": "sw0", "kind": "pcie", "gbps": 25}


def test_a_link_latency_over_a_second_is_refused(tmp_path: Path) -> None:
    """A billion microseconds on one link made the search keep a layout thousands of times slower
    than the ZO2 baseline it printed beside it."""
    data = _valid()
    data["links"][1]["latency_us"] = 1e9
    assert "links.1.latency_us" in _error(_write(tmp_path, data))


def test_invalid_yaml_reports_line(tmp_path: Path) -> None:
    text = "version: 1\nname: broken\nsockets: [\n  {id: cpu0\n"
    message = _error(_write(tmp_path, text))
    assert "invalid YAML" in message and "line 5" in message  # the unclosed brace, at end of file


def test_gpu_model_not_defined(tmp_path: Path) -> None:
    data = _valid()
    data["gpus"][1]["model"] = "h200"
    message = _error(_write(tmp_path, data))
    assert "gpus.1.model 'h200' is not in gpu_models" in message


def test_duplicate_link_between_same_pair(tmp_path: Path) -> None:
    data = _valid()
    # Listed the other way round: still the same pair, and it would overwrite the first in the graph.
    data["links"].append({"a": "gpu0", "b": "sw0", "kind": "pcie", "gbps": 20})
    message = _error(_write(tmp_path, data))
    assert "links.3" in message and "links.1" in message


def test_link_kind_must_fit_its_ends(tmp_path: Path) -> None:
    data = _valid()
    data["links"][1]["kind"] = "socket"
    message = _error(_write(tmp_path, data))
    assert "links.1.kind 'socket'" in message


def test_unknown_bundled_name_lists_the_choices() -> None:
    with pytest.raises(ZoplanError) as info:
        load_topology("dgx-z900")
    assert "dgx-z900" in str(info.value) and "dgx-a100" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    assert "does not exist" in _error(tmp_path / "nope.yaml")


# ----- views ----------------------------------------------------------------------------------------
def _text(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(renderable)
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_render_dgx_a100_tree_shows_switches_links_and_nvswitch(dgx_a100: Machine) -> None:
    text = _text(render_topology(dgx_a100))
    assert "cpu0 (socket) · 1 TiB host memory · 204.8 GB/s" in text
    assert "pcie0 (PCIe switch) · uplink H2D 25 / D2H 25 GB/s" in text
    assert "gpu0 a100-sxm4-80gb · 80 GiB at 2039 GB/s · 312 TFLOP/s bf16" in text
    assert "nvswitch (NVSwitch)" in text and "200 GB/s each" in text
    assert "cpu0 ↔ cpu1 · 64 / 64 GB/s" in text
    # gpu0 must be drawn under pcie0, i.e. after it and before pcie1.
    assert text.index("pcie0 (PCIe") < text.index("gpu0 a100") < text.index("pcie1 (PCIe")


def test_render_l40s_and_cpu_only() -> None:
    assert "NVLink: none" in _text(render_topology(load_topology("l40s-8x")))
    text = _text(render_topology(load_topology("cpu-local")))
    memory_gbps = load_topology("cpu-local").spec.sockets[0].memory_gbps
    assert f"cpu0 (socket) · 23.5 GiB host memory · {memory_gbps:g} GB/s" in text
    assert "rank0 cpu-rank" in text and "CPU rank, copies" in text and "NVLink" not in text


def test_render_shows_direction_asymmetry() -> None:
    text = _text(render_topology(load_topology("dgx-h100")))
    assert "uplink H2D 55 / D2H 47 GB/s" in text


def test_topology_rows_summarise_each_machine() -> None:
    rows = {r.name: r for r in topology_rows([load_topology(n) for n in BUNDLED])}
    assert rows["dgx-a100"].gpus == "8× a100-sxm4-80gb"
    assert rows["dgx-a100"].nvlink == "yes"
    assert rows["dgx-a100"].host_memory == "2 TiB"
    assert rows["dgx-a100"].price == "$27.45/h"
    assert rows["l40s-8x"].nvlink == "no"
    assert rows["cpu-local"].gpus == "none: 2 CPU ranks"
    assert rows["rtx4090-4x"].price == "—"


def test_topology_rows_partial_nvlink(tmp_path: Path) -> None:
    data = _valid()
    data["gpus"].append({"id": "gpu2", "model": "h100"})
    data["links"].append({"a": "sw0", "b": "gpu2", "kind": "pcie", "gbps": 25})
    data["links"].append({"a": "gpu0", "b": "gpu1", "kind": "nvlink", "gbps": 50})  # a bridged pair
    machine = load_topology(_write(tmp_path, copy.deepcopy(data)))
    assert topology_rows([machine])[0].nvlink == "partial"
    assert machine.peer_path("gpu0", "gpu1") == ["gpu0->gpu1"]


def test_topology_table_has_a_row_per_name() -> None:
    table = topology_table(BUNDLED)
    assert table.row_count == len(BUNDLED)
    assert [c.header for c in table.columns] == ["Name", "GPUs", "NVLink", "Host memory", "Price"]
    assert "8× h100-sxm5-80gb" in _text(table)


def test_the_format_example_in_the_docs_loads(tmp_path: Path) -> None:
    text = (Path(__file__).parents[2] / "docs" / "topologies.md").read_text(encoding="utf-8")
    example = text.split("## Format (version 1)")[1].split("```yaml")[1].split("```")[0]
    path = tmp_path / "example.yaml"
    path.write_text(example)
    machine = load_topology(str(path))
    assert machine.gpus == ["gpu0"] and machine.host_path("gpu0", "h2d")
