"""``zoplan topo import``: topology files built from the text of ``nvidia-smi topo -m``.

The fixtures in tests/fixtures/nvidia-smi/ were written for these tests from the format described
in docs/hardware-sources.md ("Reading nvidia-smi topo -m") and the shape of real outputs:

- dgx-a100-like.txt: 8 GPUs, every pair NV12 (NVSwitch), NICs NIC0..NIC9 with a NIC Legend, the
  newer layout (GPU NUMA ID column, whose cell follows an empty one). GPU pairs 0-1, 2-3, 4-5, 6-7
  are PXB to the same two NICs (the DGX A100's four PCIe switches, 2 GPUs + 2 NICs each); GPUs 0-3
  on NUMA node 0, 4-7 on node 1.
- l40s-8x-like.txt: 8 GPUs without NVLink on two sockets, the older layout (no GPU NUMA ID), NICs as
  mlx5_0 / mlx5_1 columns without a NIC Legend; pairs 0-1, 2-3, 4-5, 6-7 are PIX (one switch each).
- workstation-4x.txt: 4 GPUs, PHB/NODE only, NUMA Affinity N/A, columns aligned with runs of spaces
  (as copied from a terminal).
- nv4-bridge-2x.txt: 2 GPUs joined by one NVLink bridge (NV4), the older layout.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from zoplan import cli
from zoplan.errors import ZoplanError
from zoplan.topology.presets import NVLINK4_BUSBW_PER_LINK, PRESETS, get_preset, preset_names
from zoplan.planner import plan
from zoplan.search import family
from zoplan.topology.importer import (
    DEFAULT_HOST_GBPS,
    ImportedTopology,
    import_nvidia_smi,
    import_topology_file,
    parse_topo_matrix,
)
from zoplan.topology import Machine, load_topology

FIXTURES = Path(__file__).parents[1] / "fixtures" / "nvidia-smi"
DGX = FIXTURES / "dgx-a100-like.txt"
L40S = FIXTURES / "l40s-8x-like.txt"
WORKSTATION = FIXTURES / "workstation-4x.txt"
NV4 = FIXTURES / "nv4-bridge-2x.txt"
SMALL = dict(global_batch=8, seq_len=256)
runner = CliRunner()


def text_of(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def imported(
    tmp_path: Path, source: Path, gpu: str, memory: float = 1024, gbps: float | None = 204.8, name: str = "imported"
) -> tuple[ImportedTopology, Machine]:
    """Import ``source``, write the YAML, and load it back the way `zoplan plan -t` does."""
    result = import_topology_file(source, gpu=gpu, host_memory_gib=memory, host_gbps=gbps, name=name)
    out = tmp_path / f"{name}.yaml"
    result.write(out)
    return result, load_topology(out)


def links_of(machine: Machine) -> set[tuple]:
    return {(l.a, l.b, l.kind, l.gbps, l.gbps_back or l.gbps, l.latency_us) for l in machine.spec.links}


def uplink_sets(machine: Machine) -> set[frozenset[str]]:
    groups: dict[str, set[str]] = {}
    for g in machine.gpus:
        groups.setdefault(machine.uplink_group(g), set()).add(g)
    return {frozenset(v) for v in groups.values()}


def small_matrix(n: int, entry: str = "SYS", numa: str = "0") -> str:
    """An n-GPU matrix in the older layout, every off-diagonal entry ``entry``."""
    head = "\t" + "\t".join(f"GPU{i}" for i in range(n)) + "\tCPU Affinity\tNUMA Affinity"
    rows = [f"GPU{i}\t" + "\t".join(" X " if i == j else entry for j in range(n)) + f"\t0-31\t{numa}" for i in range(n)]
    return "\n".join([head, *rows]) + "\n\nLegend:\n\n  X    = Self\n"


def error_of(text: str, gpu: str = "a100-sxm4-80gb") -> str:
    with pytest.raises(ZoplanError) as exc:
        import_nvidia_smi(text, gpu=gpu, host_memory_gib=512)
    return exc.value.message


# ----- the four machines: import, load, structure, plan -------------------------------------------
def test_dgx_like_import_is_the_bundled_dgx_a100(tmp_path: Path) -> None:
    result, machine = imported(tmp_path, DGX, "a100-sxm4-80gb", memory=1024, gbps=204.8)
    assert result.matrix.layout.startswith("newer") and result.matrix.nics == tuple(f"NIC{i}" for i in range(10))
    assert machine.gpus == [f"gpu{i}" for i in range(8)]
    assert [s.id for s in machine.spec.sockets] == ["cpu0", "cpu1"]
    assert [machine.host_socket(g) for g in machine.gpus] == ["cpu0"] * 4 + ["cpu1"] * 4
    # the NIC columns reveal the pairs behind one switch (the GPU-GPU entries only say NV12)
    assert uplink_sets(machine) == {frozenset({f"gpu{2 * k}", f"gpu{2 * k + 1}"}) for k in range(4)}
    assert machine.uplink_group("gpu0") == machine.uplink_group("gpu1") == "cpu0->pcie0"
    assert machine.has_nvlink(machine.gpus)
    assert machine.peer_path("gpu0", "gpu5") == ["gpu0->nvswitch", "nvswitch->gpu5"]
    # every figure and every link is the bundled file's (its figures are the presets' sources)
    bundled = load_topology("dgx-a100")
    assert links_of(machine) == links_of(bundled)
    assert machine.spec.gpu_models == bundled.spec.gpu_models
    assert machine.spec.sockets == bundled.spec.sockets
    assert {(s.id, s.kind) for s in machine.spec.switches} == {(s.id, s.kind) for s in bundled.spec.switches}


def test_dgx_like_import_plans_the_same_layout_family_as_bundled(tmp_path: Path) -> None:
    _, machine = imported(tmp_path, DGX, "a100-sxm4-80gb", memory=1024, gbps=204.8, name="dgx")
    mine = plan("opt-1.3b", machine.source, **SMALL).search.best
    theirs = plan("opt-1.3b", "dgx-a100", **SMALL).search.best
    assert (mine.layout.perturbation, mine.layout.data) == (theirs.layout.perturbation, theirs.layout.data)
    assert mine.layout.movers == theirs.layout.movers
    assert family(mine.layout) == family(theirs.layout)
    assert mine.step_time_s == pytest.approx(theirs.step_time_s, rel=1e-9)


def test_l40s_like_old_layout_two_sockets_switch_pairs_no_nvlink(tmp_path: Path) -> None:
    result, machine = imported(tmp_path, L40S, "l40s-48gb", memory=768, gbps=204.8)
    assert result.matrix.layout == "older" and result.matrix.nics == ("mlx5_0", "mlx5_1")
    assert result.matrix.columns == ("CPU Affinity", "NUMA Affinity")
    assert len(machine.gpus) == 8 and [s.id for s in machine.spec.sockets] == ["cpu0", "cpu1"]
    assert {machine.host_socket(g) for g in ("gpu0", "gpu1", "gpu2", "gpu3")} == {"cpu0"}
    assert {machine.host_socket(g) for g in ("gpu4", "gpu5", "gpu6", "gpu7")} == {"cpu1"}
    assert uplink_sets(machine) == {frozenset({f"gpu{2 * k}", f"gpu{2 * k + 1}"}) for k in range(4)}
    assert not machine.has_nvlink(["gpu0", "gpu1"])
    assert not any(l.kind == "nvlink" for l in machine.spec.links)
    # the same machine the bundled l40s-8x describes (one common layout of such servers)
    assert links_of(machine) == links_of(load_topology("l40s-8x"))
    best = plan("opt-1.3b", machine.source, **SMALL).search.best
    assert best.step_time_s > 0 and set(best.layout.compute_gpus) <= set(machine.gpus)


def test_workstation_phb_node_only_one_socket_own_links(tmp_path: Path) -> None:
    result, machine = imported(tmp_path, WORKSTATION, "rtx4090-24gb", memory=256, gbps=204.8)
    assert result.matrix.numa_affinity == (None,) * 4  # N/A: the socket is inferred
    assert len(machine.gpus) == 4 and [s.id for s in machine.spec.sockets] == ["cpu0"]
    # nobody shares an uplink: each GPU's first link below the socket is its own
    assert uplink_sets(machine) == {frozenset({g}) for g in machine.gpus}
    assert machine.uplink_group("gpu2") == "cpu0->gpu2"
    assert machine.spec.switches == []
    assert not machine.has_nvlink(machine.gpus)
    assert links_of(machine) == links_of(load_topology("rtx4090-4x"))
    best = plan("opt-1.3b", machine.source, **SMALL).search.best
    assert best.step_time_s > 0 and set(best.layout.compute_gpus) <= set(machine.gpus)


def test_two_gpus_with_an_nv4_bridge_get_a_direct_nvlink(tmp_path: Path) -> None:
    result, machine = imported(tmp_path, NV4, "h100-pcie-80gb", memory=256, gbps=243.5)
    assert result.nvlink == "direct"
    assert len(machine.gpus) == 2 and [s.id for s in machine.spec.sockets] == ["cpu0"]
    assert machine.has_nvlink(["gpu0", "gpu1"])
    assert machine.peer_path("gpu0", "gpu1") == ["gpu0->gpu1"]
    nv = [l for l in machine.spec.links if l.kind == "nvlink"]
    assert len(nv) == 1 and nv[0].gbps == pytest.approx(4 * NVLINK4_BUSBW_PER_LINK, abs=0.01)
    assert uplink_sets(machine) == {frozenset({"gpu0"}), frozenset({"gpu1"})}
    # NVLink hides the PCIe relation of the pair and there are no NICs: said, not silently guessed
    assert any("NVLink hides" in w for w in result.warnings)
    best = plan("opt-1.3b", machine.source, **SMALL).search.best
    assert best.step_time_s > 0 and set(best.layout.compute_gpus) <= set(machine.gpus)


# ----- parsing variants ---------------------------------------------------------------------------
def test_tabs_spaces_and_colour_codes_parse_the_same() -> None:
    tabs = parse_topo_matrix(text_of(DGX))
    spaces = parse_topo_matrix(text_of(DGX).expandtabs(8))
    lines = text_of(DGX).split("\n")
    lines[0] = "\x1b[4m" + lines[0] + "\x1b[0m"  # a terminal's underlined header
    coloured = parse_topo_matrix("\n".join(lines))
    for m in (spaces, coloured):
        assert m.entries == tabs.entries and m.nic_entries == tabs.nic_entries
        assert m.numa_affinity == tabs.numa_affinity == (0, 0, 0, 0, 1, 1, 1, 1)
        assert m.gpu_numa_id == ("N/A",) * 8


def test_soc_is_an_old_name_for_sys() -> None:
    sys_spec = import_nvidia_smi(text_of(L40S), gpu="l40s-48gb", host_memory_gib=768).spec
    soc_spec = import_nvidia_smi(text_of(L40S).replace("SYS", "SOC"), gpu="l40s-48gb", host_memory_gib=768).spec
    assert soc_spec == sys_spec


def test_prompt_lines_before_the_header_are_skipped() -> None:
    m = parse_topo_matrix("$ nvidia-smi topo -m\n" + text_of(NV4))
    assert m.gpus == 2 and m.header_line == 2 and m.row_lines == (3, 4)


@pytest.mark.parametrize("source, gpu", [(L40S, "l40s-48gb"), (DGX, "a100-sxm4-80gb")])
def test_sockets_are_inferred_from_sys_when_numa_affinity_is_na(source: Path, gpu: str) -> None:
    text = text_of(source)
    # NUMA Affinity cells are '0' / '1' right after the CPU list: make them N/A
    text = text.replace("143\t0", "143\tN/A").replace("191\t1", "191\tN/A")
    text = text.replace("191\t0", "191\tN/A").replace("255\t1", "255\tN/A")
    result = import_nvidia_smi(text, gpu=gpu, host_memory_gib=512)
    assert result.matrix.numa_affinity == (None,) * 8
    machine = Machine(result.spec, "test")
    assert [s.id for s in result.spec.sockets] == ["cpu0", "cpu1"]
    assert [machine.host_socket(g) for g in machine.gpus] == ["cpu0"] * 4 + ["cpu1"] * 4
    assert "inferred" in result.text


def test_all_nv_pairs_within_one_gpus_link_budget_are_direct_links() -> None:
    # 4 A100s all NV4 (a 4-GPU HGX board): 3 peers x 4 links = the 12 an A100 has, so no NVSwitch
    result = import_nvidia_smi(small_matrix(4, "NV4"), gpu="a100-sxm4-80gb", host_memory_gib=512)
    assert result.nvlink == "direct"
    nv = [l for l in result.spec.links if l.kind == "nvlink"]
    assert len(nv) == 6 and all(l.gbps == pytest.approx(4 * 200 / 12, abs=0.01) for l in nv)
    assert not any(s.kind == "nvswitch" for s in result.spec.switches)
    # 8 of them all NV12 cannot be direct: an NVSwitch
    switched = import_nvidia_smi(small_matrix(8, "NV12"), gpu="a100-sxm4-80gb", host_memory_gib=512)
    assert switched.nvlink == "nvswitch"
    assert sum(1 for l in switched.spec.links if l.kind == "nvlink") == 8


def test_generated_file_carries_sources_and_round_trips(tmp_path: Path) -> None:
    result, machine = imported(tmp_path, DGX, "a100-sxm4-80gb", gbps=None)
    assert machine.spec == result.spec
    comments = [line for line in result.text.splitlines() if line.lstrip().startswith("#")]
    assert len(comments) >= 20
    for needle in (
        "nvbandwidth issue 42",
        "nccl-tests issue 149",
        "A100 datasheet",
        "hwLat",
        "--host-memory-gib",
        "ASSUMED",
        "dgx-a100-like.txt",
    ):
        assert needle in result.text, needle
    # no --host-gbps: the documented default, a warning, and the figure marked ASSUMED in the file
    assert {s.memory_gbps for s in result.spec.sockets} == {DEFAULT_HOST_GBPS}
    assert any("--host-gbps not given" in w for w in result.warnings)
    assert "204.8 GB/s (ASSUMED" in result.text
    assert yaml.safe_load(result.text)["name"] == "imported"


# ----- GPU presets --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "topology, model",
    [
        ("dgx-a100", "a100-sxm4-80gb"),
        ("dgx-h100", "h100-sxm5-80gb"),
        ("hgx-h200", "h200-sxm-141gb"),
        ("h100-pcie-1x", "h100-pcie-80gb"),
        ("l40s-8x", "l40s-48gb"),
        ("rtx4090-4x", "rtx4090-24gb"),
    ],
)
def test_presets_match_the_bundled_topologies(topology: str, model: str) -> None:
    bundled = load_topology(topology)
    preset = get_preset(model)
    figures = bundled.spec.gpu_models[model].model_dump()
    # the runtime's own work: none charged on GPUs (zoplan.sim.costs; tests/sim/test_costs.py)
    runtime = {
        k: figures.pop(k)
        for k in (
            "op_us",
            "cold_op_us",
            "z_ns",
            "z_call_us",
            "z_cold_us",
            "z_first_ns",
            "collective_us",
            "collective_gbps",
            "loop_us",
        )
    }
    assert set(runtime.values()) == {0.0}
    assert figures.pop("threads_efficiency") == 1.0  # a CPU rank's figures
    assert figures.pop("matmul_half_tokens") == 0.0
    assert figures.pop("cache_mib") == 0.0
    assert (figures.pop("lockstep"), figures.pop("lockstep_wait_us")) == (1.0, 0.0)
    assert figures.pop("meetings") == "shared-memory"  # the default: only CPU ranks read it
    assert figures == {"kind": "gpu", **preset.gpu_model()}
    pcie = next(l for l in bundled.spec.links if l.kind == "pcie")
    assert (preset.h2d_gbps, preset.d2h_gbps) == (pcie.gbps, pcie.gbps_back or pcie.gbps)
    nvlink = [l for l in bundled.spec.links if l.kind == "nvlink"]
    if nvlink:  # the bundled NVSwitch figure is NV<all links> x the per-link figure
        assert preset.nvlink_gbps(preset.nvlink_links) == pytest.approx(nvlink[0].gbps)


def test_every_preset_has_a_source_for_every_figure() -> None:
    assert preset_names() == sorted(
        [
            "a100-sxm4-80gb",
            "a100-sxm4-40gb",
            "h100-sxm5-80gb",
            "h100-pcie-80gb",
            "h200-sxm-141gb",
            "l40s-48gb",
            "rtx4090-24gb",
        ]
    )
    for preset in PRESETS.values():
        assert {"memory_gib", "tflops", "hbm_gbps", "matmul_efficiency", "pcie", "nvlink"} <= set(preset.sources)
        assert set(preset.tflops) == {"fp32", "tf32", "bf16", "fp16"}
        assert preset.has_nvlink == (preset.nvlink_links > 0 and preset.nvlink_gbps_per_link > 0)
    h200, h100 = get_preset("h200-sxm-141gb"), get_preset("h100-sxm5-80gb")
    assert (h200.memory_gib, h200.hbm_gbps, h200.tflops) == (141, 4800, h100.tflops)
    assert not get_preset("L40S-48GB").has_nvlink  # names are case-insensitive


# ----- bad input ----------------------------------------------------------------------------------
def test_truncated_row_names_the_line_and_the_count() -> None:
    lines = small_matrix(8).split("\n")
    lines[2] = "\t".join(lines[2].split("\t")[:7])  # GPU1: 6 entries, no affinity
    assert error_of("\n".join(lines)) == "line 3: expected one entry per GPU column (8), found 6"
    # with NIC columns the count includes them
    dgx = text_of(DGX).split("\n")
    dgx[4] = "\t".join(dgx[4].split("\t")[:7]) + "\t0-63,128-191\t0"
    assert error_of("\n".join(dgx)).startswith("line 5: expected one entry per GPU/NIC column (18), found 6")


def test_unknown_entry_names_the_line_and_the_token() -> None:
    text = small_matrix(4, "NV4").replace("GPU0\t X \tNV4\tNV4\tNV4", "GPU0\t X \tNV4\tNV99X\tNV4")
    assert error_of(text).startswith("line 2: unknown link entry 'NV99X' in column GPU2")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("", "line 1: the text is empty"),
        ("\n\nNo devices were found\n", "line 3: no GPU columns"),
        (
            "\tNIC0\tNIC1\tCPU Affinity\tNUMA Affinity\nNIC0\t X \tPIX\t\t\nNIC1\tPIX\t X \t\t\n",
            "line 1: no GPU columns in the header",
        ),
        ("GPU0\t X \tNV4\t0-31\t0\nGPU1\tNV4\t X \t0-31\t0\n", "line 1: expected the header line"),
    ],
)
def test_no_gpu_columns_names_the_line(text: str, needle: str) -> None:
    assert error_of(text).startswith(needle)


def test_missing_rows_asymmetry_and_stray_lines_are_errors() -> None:
    cut = "\n".join(small_matrix(4).split("\n")[:3])  # header + GPU0 + GPU1 only
    assert error_of(cut).startswith("line 1: the header names GPU2, GPU3 but no row")
    lopsided = small_matrix(3, "PHB").replace("GPU2\tPHB\tPHB", "GPU2\tPHB\tSYS")
    assert error_of(lopsided).startswith("line 4: GPU2-GPU1 is 'SYS' but GPU1-GPU2 (line 3) is 'PHB'")
    stray = small_matrix(2).replace("\n\nLegend", "\nsomething else\nLegend")
    assert error_of(stray).startswith("line 4: expected a row of the matrix")
    off_diagonal = small_matrix(2).replace("GPU1\tSYS\t X ", "GPU1\t X \t X ")
    assert "expected a link entry, not X" in error_of(off_diagonal)


def test_nvlink_entries_must_fit_the_gpu_model() -> None:
    message = error_of(text_of(NV4), gpu="l40s-48gb")
    assert message.startswith("line 2: GPU0-GPU1 is NV4") and "has no NVLink" in message
    assert "12 NVLinks" in error_of(small_matrix(8, "NV18"), gpu="a100-sxm4-80gb")


def test_unknown_gpu_lists_the_presets_and_host_memory_is_required() -> None:
    with pytest.raises(ZoplanError) as exc:
        import_nvidia_smi(text_of(NV4), gpu="a100", host_memory_gib=512)
    assert "unknown GPU model 'a100'" in exc.value.message
    assert all(name in exc.value.fix for name in preset_names())
    with pytest.raises(ZoplanError) as exc:
        import_nvidia_smi(text_of(L40S), gpu="l40s-48gb", host_memory_gib=None)
    assert "--host-memory-gib" in exc.value.message and "2 sockets" in exc.value.message


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "topo.txt"
    bad.write_text(small_matrix(4, "NV4").replace("NV4\t0-31", "NVX\t0-31", 1), encoding="utf-8")
    with pytest.raises(ZoplanError) as exc:
        import_topology_file(bad, gpu="a100-sxm4-80gb", host_memory_gib=512)
    assert exc.value.message.startswith(f"{bad}: line 2: unknown link entry 'NVX'")
    with pytest.raises(ZoplanError) as exc:
        import_topology_file(tmp_path / "missing.txt", gpu="a100-sxm4-80gb", host_memory_gib=512)
    assert "does not exist" in exc.value.message


# ----- the command --------------------------------------------------------------------------------
@pytest.fixture()
def plain_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "out", Console(width=160, color_system=None, force_terminal=False))
    monkeypatch.setattr(cli, "err", Console(stderr=True, width=160, color_system=None, force_terminal=False))


def import_command(matrix: Path, gpu: str, out: Path):
    """``zoplan topo import MATRIX --gpu GPU`` with the host figures given."""
    args = ["topo", "import", str(matrix), "--gpu", gpu, "-o", str(out), "--host-memory-gib", "1024"]
    return runner.invoke(cli.app, [*args, "--host-gbps", "204.8"])


@pytest.mark.parametrize(
    ("matrix", "printed", "preset"),
    [
        (DGX, "NVIDIA A100-SXM4-80GB", "a100-sxm4-80gb"),
        (L40S, "L40S", "l40s-48gb"),
        (WORKSTATION, "NVIDIA GeForce RTX 4090", "rtx4090-24gb"),
    ],
)
def test_import_takes_the_gpu_name_nvidia_smi_prints(
    tmp_path: Path, plain_consoles, matrix: Path, printed: str, preset: str
) -> None:
    out = tmp_path / "machine.yaml"
    result = import_command(matrix, printed, out)
    assert result.exit_code == 0, result.output
    assert {g["model"] for g in yaml.safe_load(out.read_text())["gpus"]} == {preset}


def test_cli_import_writes_a_file_that_plans(tmp_path: Path, plain_consoles) -> None:
    out = tmp_path / "machine.yaml"
    result = import_command(DGX, "a100-sxm4-80gb", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"wrote {out}: 8x a100-sxm4-80gb, NVSwitch")
    assert len(result.stdout.strip().splitlines()) == 1
    machine = load_topology(out)
    assert machine.name == "machine" and len(machine.gpus) == 8  # name: the output file's stem
    planned = runner.invoke(cli.app, ["plan", "-t", str(out), "-m", "opt-1.3b", "-b", "8", "-s", "256", "--json"])
    assert planned.exit_code == 0, planned.output
    assert '"topology": "machine"' in planned.stdout


def test_cli_import_name_option_and_host_gbps_warning(tmp_path: Path, plain_consoles) -> None:
    out = tmp_path / "box.yaml"
    result = runner.invoke(
        cli.app,
        [
            "topo",
            "import",
            str(WORKSTATION),
            "--gpu",
            "rtx4090-24gb",
            "-o",
            str(out),
            "--host-memory-gib",
            "256",
            "--name",
            "my-box",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "warning: --host-gbps not given" in result.stderr
    assert load_topology(out).name == "my-box"


def test_cli_import_bad_input_exits_2_with_the_line(tmp_path: Path, monkeypatch, capsys, plain_consoles) -> None:
    bad = tmp_path / "topo.txt"
    lines = small_matrix(8).split("\n")
    lines[4] = "\t".join(lines[4].split("\t")[:7])
    bad.write_text("\n".join(lines), encoding="utf-8")
    out = tmp_path / "never.yaml"
    for args, needle in [
        (
            [str(bad), "--gpu", "l40s-48gb", "-o", str(out), "--host-memory-gib", "64"],
            "line 5: expected one entry per GPU column (8), found 6",
        ),
        ([str(NV4), "--gpu", "v100", "-o", str(out), "--host-memory-gib", "64"], "unknown GPU model 'v100'"),
        ([str(NV4), "--gpu", "l40s-48GB ", "-o", str(out)], "--host-memory-gib"),  # case and spaces forgiven
        (
            [str(NV4), "--gpu", "a100-sxm4-80", "-o", str(out), "--host-memory-gib", "64"],
            "did you mean 'a100-sxm4-80gb'",
        ),
        ([str(NV4), "--gpu", "h100-pcie-80gb", "-o", str(out)], "--host-memory-gib"),
        ([str(NV4), "-o", str(out), "--host-memory-gib", "64"], "pass --gpu"),
    ]:
        monkeypatch.setattr(sys, "argv", ["zoplan", "topo", "import", *args])
        with pytest.raises(SystemExit) as exc:
            cli.main()
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and needle in err, err
        assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "name,said",
    [
        ("a100-sxm4-80", ": did you mean 'a100-sxm4-80gb'?"),
        ("A100_SXM4_80GB", ": did you mean 'a100-sxm4-80gb'?"),
        ("h100_sxm5", ": did you mean 'h100-sxm5-80gb'?"),
        # another card of a chip zoplan knows: said as such, never a preset of another chip
        (
            "NVIDIA A100-PCIE-40GB",
            " (zoplan has no preset for this A100: its A100 presets, a100-sxm4-40gb, a100-sxm4-80gb, are other variants)",
        ),
        ("NVIDIA L40", ""),  # not the L40S
        ("l40-48gb", ""),
        ("Tesla V100-SXM2-32GB", ""),
    ],
)
def test_a_gpu_name_is_suggested_only_as_a_typo_of_the_same_chip(name: str, said: str) -> None:
    with pytest.raises(ZoplanError) as exc:
        get_preset(name)
    assert exc.value.message == f"unknown GPU model '{name}'{said}"


def test_importing_does_not_import_torch() -> None:
    code = "import sys, zoplan.topology.importer, zoplan.topology.presets, zoplan.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize("option", ["memory", "gbps"])
@pytest.mark.parametrize("value", [0.0, -2.0, float("inf"), float("nan")])
def test_a_host_size_or_rate_that_is_not_a_positive_number_is_refused(option: str, value: float) -> None:
    """--host-memory-gib and --host-gbps: a positive, finite number, or one message naming the
    option (an infinite one was taken, then failed writing the file)."""
    sizes = {"host_memory_gib": 512.0, "host_gbps": 100.0}
    flag = {"memory": ("host_memory_gib", "--host-memory-gib"), "gbps": ("host_gbps", "--host-gbps")}[option]
    sizes[flag[0]] = value
    with pytest.raises(ZoplanError) as exc:
        import_nvidia_smi(text_of(L40S), gpu="l40s-48gb", **sizes)
    assert exc.value.message == f"{flag[1]} must be a positive number, got {value}"
