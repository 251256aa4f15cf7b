"""GPU specifications by name, for building a topology from ``nvidia-smi topo -m`` output.

``nvidia-smi topo -m`` says how the GPUs are connected but not what they are or how fast their
links run: ``zoplan topo import --gpu NAME`` takes those figures from here. Every figure has its
source in a comment beside it; they are the same numbers (and sources) as the bundled topologies
in ``topologies/*.yaml`` and ``docs/hardware-sources.md``, so an imported DGX A100 gets
exactly the figures of the bundled ``dgx-a100``. Each source also travels into the generated YAML
as a comment, so an imported file stays as traceable as a bundled one.

Units: GB/s = 1e9 bytes/s per direction; TFLOP/s dense (without sparsity).
"""

from __future__ import annotations

import difflib
import re

from dataclasses import dataclass, field
from typing import Any

from zoplan.errors import ZoplanError, did_you_mean

# NVLink line rate per link and direction: 25 GB/s for NVLink3 (A100: 12 links = 300 GB/s per
# direction, "600 GB/s" bidirectional) and NVLink4 (H100: 18 links = 450 GB/s per direction,
# "900 GB/s" bidirectional). NVIDIA A100 / H100 datasheets; docs/hardware-sources.md
# "GPU-to-GPU links".
NVLINK_LINE_GBPS_PER_LINK = 25.0

# The simulator times collectives from a link's figure, so (docs/topologies.md) an NVLink link
# carries the bandwidth collectives REACH, not the line rate. Per link, that is the measured
# nccl-tests bus bandwidth divided by the links it ran over:
#  - NVLink3, 8x A100 NVSwitch: all-gather busbw ~200 GB/s over 12 links (nccl-tests issue 149;
#    docs/hardware-sources.md) -> 200/12 = 16.67 GB/s per link (the bundled dgx-a100 uses 200
#    for NV12).
#  - NVLink4, 8x H100 NVSwitch: ring all-gather busbw ~370 GB/s over 18 links (nccl-tests issue
#    212, maintainer; docs/hardware-sources.md) -> 370/18 = 20.56 GB/s per link (the bundled
#    dgx-h100: 370).
NVLINK3_BUSBW_PER_LINK = 200.0 / 12
NVLINK4_BUSBW_PER_LINK = 370.0 / 18


@dataclass(frozen=True)
class GpuPreset:
    """One GPU model: the ``gpu_models`` entry of a topology plus its host and NVLink figures."""

    name: str
    title: str
    memory_gib: float
    tflops: dict[str, float]
    hbm_gbps: float
    matmul_efficiency: float
    pcie_gen: int
    h2d_gbps: float  # pinned host-to-device copy over the GPU's own x16 link
    d2h_gbps: float
    nvlink_gen: int | None = None  # None: the GPU has no NVLink
    nvlink_links: int = 0  # NVLinks one GPU has in all (NV# cannot exceed it)
    nvlink_gbps_per_link: float = 0.0  # achieved (busbw) per link and direction, see above
    # one comment per figure, copied into the generated topology file
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def has_nvlink(self) -> bool:
        return self.nvlink_gen is not None

    def gpu_model(self) -> dict[str, Any]:
        """The ``gpu_models`` entry of a topology file (TopologySpec's GpuModel fields)."""
        return {
            "memory_gib": self.memory_gib,
            "tflops": dict(self.tflops),
            "hbm_gbps": self.hbm_gbps,
            "matmul_efficiency": self.matmul_efficiency,
        }

    def nvlink_gbps(self, links: int) -> float:
        """The figure of a bonded set of ``links`` NVLinks (nvidia-smi ``NV#``)."""
        return round(links * self.nvlink_gbps_per_link, 2)


_EFF_SRC = "790/989 = 0.80 was measured for an 8192^3 bf16 matmul on H100/H200 (docs/hardware-sources.md)"
_GEN4_SRC = (
    "PCIe Gen4 x16, pinned memory: ~25 GB/s H2D measured on an A100-SXM4 (nvbandwidth "
    "host_to_device_memcpy_sm 25.13 GB/s, NVIDIA/nvbandwidth issue 42), ~25 GB/s D2H on an "
    "8xA100-SXM4-80GB box (NVIDIA/nvbandwidth issue 53)"
)
_GEN5_SRC = (
    "PCIe Gen5 x16, pinned memory: ~55 GB/s H2D, ~47 GB/s D2H (nvbandwidth on an H800 box; "
    "aigatech vpbenchmarking; docs/hardware-sources.md)"
)
_NVLINK3_SRC = (
    "NVLink3, 12 links per GPU at 25 GB/s per direction (A100 spec); per link the measured "
    "8xA100 all-gather busbw ~200 GB/s / 12 = 16.67 GB/s (NVIDIA/nccl-tests issue 149; "
    "docs/hardware-sources.md)"
)
_NVLINK4_SRC = (
    "NVLink4, 18 links per GPU at 25 GB/s per direction (H100 spec); per link the measured "
    "8xH100 ring all-gather busbw ~370 GB/s / 18 = 20.56 GB/s (NVIDIA/nccl-tests issue "
    "212, maintainer; docs/hardware-sources.md)"
)

_A100_TFLOPS = {"fp32": 19.5, "tf32": 156, "bf16": 312, "fp16": 312}
_A100_TFLOPS_SRC = "NVIDIA A100 datasheet, dense (without sparsity): FP32 19.5, TF32 156, BF16 312, FP16 312 TFLOP/s"
_H100_TFLOPS = {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4}
_H100_TFLOPS_SRC = (
    "dense peak (the H100 datasheet lists sparse figures; dense = half): FP32 66.9, "
    "TF32 494.7, BF16 989.4, FP16 989.4 TFLOP/s (glennklockwood.com/garden/processors/h100)"
)

PRESETS: dict[str, GpuPreset] = {
    p.name: p
    for p in (
        GpuPreset(
            name="a100-sxm4-80gb",
            title="NVIDIA A100-SXM4-80GB",
            memory_gib=80,  # nvidia-smi reports 81920 MiB (SkyPilot Lambda catalog, gpu_8x_a100_80gb_sxm4)
            tflops=_A100_TFLOPS,
            hbm_gbps=2039,  # NVIDIA A100 datasheet: A100 80GB SXM HBM2e 2,039 GB/s
            matmul_efficiency=0.80,  # ASSUMED from H100/H200 until calibrated (docs/hardware-sources.md)
            pcie_gen=4,
            h2d_gbps=25,
            d2h_gbps=25,  # _GEN4_SRC
            nvlink_gen=3,
            nvlink_links=12,
            nvlink_gbps_per_link=NVLINK3_BUSBW_PER_LINK,
            sources={
                "memory_gib": "80 GiB: nvidia-smi reports 81920 MiB for A100-80GB (SkyPilot Lambda "
                "catalog, gpu_8x_a100_80gb_sxm4 SizeInMiB 81920)",
                "tflops": _A100_TFLOPS_SRC,
                "hbm_gbps": "NVIDIA A100 datasheet: A100 80GB SXM HBM2e 2,039 GB/s",
                "matmul_efficiency": _EFF_SRC + "; ASSUMED to carry over to A100",
                "pcie": _GEN4_SRC,
                "nvlink": _NVLINK3_SRC,
            },
        ),
        GpuPreset(
            name="a100-sxm4-40gb",
            title="NVIDIA A100-SXM4-40GB",
            memory_gib=40,  # NVIDIA A100 datasheet: 40 GB HBM2
            tflops=_A100_TFLOPS,  # same GA100 compute as the 80 GB part (A100 datasheet)
            hbm_gbps=1555,  # NVIDIA A100 datasheet: A100 40GB 1,555 GB/s (glennklockwood.com/garden/processors/A100)
            matmul_efficiency=0.80,  # ASSUMED, as for the 80 GB part
            pcie_gen=4,
            h2d_gbps=25,
            d2h_gbps=25,  # _GEN4_SRC: same host interface as the 80 GB part
            nvlink_gen=3,
            nvlink_links=12,
            nvlink_gbps_per_link=NVLINK3_BUSBW_PER_LINK,
            sources={
                "memory_gib": "NVIDIA A100 datasheet: 40 GB HBM2 (nominal, kept as GiB like the bundled files)",
                "tflops": _A100_TFLOPS_SRC + " (same GA100 compute as the 80 GB part)",
                "hbm_gbps": "NVIDIA A100 datasheet: A100 40GB HBM2 1,555 GB/s "
                "(glennklockwood.com/garden/processors/A100)",
                "matmul_efficiency": _EFF_SRC + "; ASSUMED to carry over to A100",
                "pcie": _GEN4_SRC + " (the 80 GB part's figures; same Gen4 x16 interface)",
                "nvlink": _NVLINK3_SRC,
            },
        ),
        GpuPreset(
            name="h100-sxm5-80gb",
            title="NVIDIA H100 SXM5 80GB",
            memory_gib=80,  # H100 datasheet: 80 GB HBM3
            tflops=_H100_TFLOPS,
            hbm_gbps=3350,  # NVIDIA H100 datasheet: H100 SXM HBM3 3.35 TB/s
            matmul_efficiency=0.80,  # measured on H100/H200 (docs/hardware-sources.md)
            pcie_gen=5,
            h2d_gbps=55,
            d2h_gbps=47,  # _GEN5_SRC
            nvlink_gen=4,
            nvlink_links=18,
            nvlink_gbps_per_link=NVLINK4_BUSBW_PER_LINK,
            sources={
                "memory_gib": "80 GB HBM3 (NVIDIA H100 datasheet); nvidia-smi shows 81559 MiB usable "
                "(SkyPilot hyperbolic catalog); the nominal 80 is kept",
                "tflops": _H100_TFLOPS_SRC,
                "hbm_gbps": "NVIDIA H100 datasheet: H100 SXM HBM3 3.35 TB/s",
                "matmul_efficiency": "790/989 = 0.80: measured for an 8192^3 bf16 matmul on H100/H200 "
                "(docs/hardware-sources.md)",
                "pcie": _GEN5_SRC,
                "nvlink": _NVLINK4_SRC,
            },
        ),
        GpuPreset(
            name="h100-pcie-80gb",
            title="NVIDIA H100 PCIe 80GB",
            memory_gib=80,  # H100 PCIe product brief PB-11133-001: 80 GB HBM2e
            tflops={"fp32": 51, "tf32": 378, "bf16": 756, "fp16": 756},
            hbm_gbps=2000,  # H100 datasheet, PCIe column: 2,000 GB/s
            matmul_efficiency=0.80,  # ASSUMED from H100 SXM/H200 (docs/hardware-sources.md)
            pcie_gen=5,
            h2d_gbps=55,
            d2h_gbps=47,  # _GEN5_SRC
            # NVLink bridges: up to 600 GB/s bidirectional = 12 NVLink4 links (H100 datasheet,
            # PCIe column); one bridge = 4 links (nvidia-smi NV4), three = 12 (NV12)
            nvlink_gen=4,
            nvlink_links=12,
            nvlink_gbps_per_link=NVLINK4_BUSBW_PER_LINK,
            sources={
                "memory_gib": "NVIDIA H100 datasheet / H100 PCIe product brief PB-11133-001: 80 GB HBM2e",
                "tflops": "NVIDIA H100 datasheet, H100 PCIe column (sparse figures halved): FP32 51, "
                "TF32 378, BF16 756, FP16 756 TFLOP/s (table reproduced at "
                "archive-lib.hpctech.co.jp/gpuproduct/nvidia-h100.html)",
                "hbm_gbps": "same table: GPU memory bandwidth 2,000 GB/s",
                "matmul_efficiency": _EFF_SRC + "; ASSUMED to hold for the lower-clocked PCIe card",
                "pcie": _GEN5_SRC,
                "nvlink": "NVLink4 bridges, up to 600 GB/s bidirectional = 12 links at 25 GB/s per "
                "direction (H100 datasheet, PCIe column); per link ASSUMED the H100 SXM "
                "measured busbw 370/18 = 20.56 GB/s (NVIDIA/nccl-tests issue 212)",
            },
        ),
        GpuPreset(
            name="h200-sxm-141gb",
            title="NVIDIA H200 SXM 141GB",
            memory_gib=141,  # 141 GB HBM3e (NVIDIA H200 datasheet; docs/hardware-sources.md)
            tflops=_H100_TFLOPS,  # same compute as H100 (NVIDIA H200 datasheet)
            hbm_gbps=4800,  # 4.8 TB/s (NVIDIA H200 datasheet)
            matmul_efficiency=0.80,  # measured on H100/H200 (docs/hardware-sources.md)
            pcie_gen=5,
            h2d_gbps=55,
            d2h_gbps=47,  # _GEN5_SRC, ASSUMED: same Gen5 x16 host interface as H100
            nvlink_gen=4,
            nvlink_links=18,
            nvlink_gbps_per_link=NVLINK4_BUSBW_PER_LINK,
            sources={
                "memory_gib": "141 GB HBM3e (NVIDIA H200 datasheet; docs/hardware-sources.md); "
                "nominal, usable memory is slightly lower",
                "tflops": "same compute as H100 (NVIDIA H200 datasheet; docs/hardware-sources.md): " + _H100_TFLOPS_SRC,
                "hbm_gbps": "4.8 TB/s HBM3e (NVIDIA H200 datasheet; docs/hardware-sources.md)",
                "matmul_efficiency": "790/989 = 0.80: measured for an 8192^3 bf16 matmul on H100/H200 "
                "(docs/hardware-sources.md)",
                "pcie": _GEN5_SRC + "; ASSUMED for H200, the same Gen5 x16 host interface",
                "nvlink": _NVLINK4_SRC + "; ASSUMED the same on H200 (same NVLink4)",
            },
        ),
        GpuPreset(
            name="l40s-48gb",
            title="NVIDIA L40S 48GB",
            memory_gib=48,  # NVIDIA L40S datasheet: 48 GB GDDR6 with ECC
            tflops={"fp32": 91.6, "tf32": 183, "bf16": 362.05, "fp16": 362.05},
            hbm_gbps=864,  # NVIDIA L40S datasheet: 864 GB/s
            matmul_efficiency=0.80,  # ASSUMED from H100/H200 (docs/hardware-sources.md)
            pcie_gen=4,
            h2d_gbps=25,
            d2h_gbps=25,  # _GEN4_SRC; L40S datasheet: PCIe Gen4 x16
            sources={
                "memory_gib": "NVIDIA L40S datasheet: 48 GB GDDR6 with ECC",
                "tflops": "NVIDIA L40S datasheet, dense (the starred figures are with sparsity): FP32 "
                "91.6, TF32 183, BF16 362.05, FP16 362.05 TFLOP/s",
                "hbm_gbps": "NVIDIA L40S datasheet: 864 GB/s",
                "matmul_efficiency": _EFF_SRC + "; ASSUMED to carry over to L40S",
                "pcie": "L40S datasheet: PCIe Gen4 x16; " + _GEN4_SRC,
                "nvlink": "none: the L40S has no NVLink (NVIDIA L40S datasheet)",
            },
        ),
        GpuPreset(
            name="rtx4090-24gb",
            title="NVIDIA GeForce RTX 4090 24GB",
            memory_gib=24,  # Ada whitepaper, Appendix A: 24 GB GDDR6X
            tflops={"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2},
            hbm_gbps=1008,  # Ada whitepaper, Appendix A: 1008 GB/s
            matmul_efficiency=0.80,  # ASSUMED from H100/H200 (docs/hardware-sources.md)
            pcie_gen=4,
            h2d_gbps=25.6,
            d2h_gbps=26.8,  # nvbandwidth issue 15 (8x RTX 4090 box)
            sources={
                "memory_gib": "NVIDIA Ada GPU architecture whitepaper, Appendix A (reproduced on "
                "vast.ai/pricing/gpu/RTX-4090): 24 GB GDDR6X",
                "tflops": "same table, dense: FP32 82.6, TF32 82.6, BF16 165.2 (FP32 accumulate), FP16 "
                "165.2 TFLOP/s (330.3 only with FP16 accumulate, which training does not use)",
                "hbm_gbps": "same table: 1008 GB/s",
                "matmul_efficiency": _EFF_SRC + "; ASSUMED to carry over to the RTX 4090",
                "pcie": "PCIe Gen4 x16 measured with nvbandwidth on an 8x RTX 4090 box (NVIDIA/nvbandwidth "
                "issue 15): host_to_device_memcpy_ce SUM 205.04 / 8 = 25.6 GB/s, "
                "device_to_host_memcpy_ce SUM 214.28 / 8 = 26.8 GB/s",
                "nvlink": "none: the RTX 4090 has no NVLink connector (NVIDIA Ada whitepaper)",
            },
        ),
    )
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str | None) -> GpuPreset:
    """The preset called ``name`` (case-insensitive); a ZoplanError listing them otherwise."""
    if name is None:
        raise ZoplanError(
            "the GPU model is not in `nvidia-smi topo -m` output: pass --gpu",
            fix=f"one of: {', '.join(preset_names())}",
        )
    preset = PRESETS.get(name.strip().lower())
    if preset is None:  # the product name nvidia-smi prints ("NVIDIA A100-SXM4-80GB", "L40S") names one too
        from zoplan.topology.detect import preset_matching

        matched = preset_matching(name)
        if matched is not None:
            return PRESETS[matched]
        raise ZoplanError(
            f"unknown GPU model '{name}'" + _gpu_did_you_mean(name),
            fix=f"pass --gpu with one of: {', '.join(preset_names())}, or the name nvidia-smi prints for one of them",
        )
    return preset


def _gpu_did_you_mean(name: str) -> str:
    """A suggestion for a GPU name no preset matches, only among the presets of the same chip
    (``a100``, ``l40s``, ``rtx4090``: the first word of a preset's name), and only for what reads as a
    typo of one: an A100 PCIe is not the A100 SXM4 nor the H100 PCIe its name is close to, and an L40
    is not an L40S. Another variant of a chip zoplan has presets for is said as such."""
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w]
    said = set(words) | {a + b for a, b in zip(words, words[1:])}
    family = [p for p in preset_names() if p.split("-")[0] in said]
    if not family:
        return ""
    # a typo: close in spelling, or every word the start of one of the preset's ("h100 sxm5")
    vendor = {"nvidia", "tesla", "geforce"}

    def reads_as(preset: str) -> bool:
        own = preset.split("-")
        if all(any(o.startswith(w) for o in own) for w in words if w not in vendor):
            return True
        return difflib.SequenceMatcher(None, "-".join(words), preset).ratio() >= 0.85

    typo = [p for p in family if reads_as(p)]
    if typo:
        return did_you_mean(name, typo) or f": did you mean {typo[0]!r}?"
    chip = family[0].split("-")[0].upper()
    return f" (zoplan has no preset for this {chip}: its {chip} presets, {', '.join(family)}, are other variants)"
