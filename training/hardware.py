"""Device and link figures of a cluster, for step-time estimates and MFU: ``cluster.hardware``.

A preset names a device (its datasheet figures, sources in ``docs/scale.md``); any field set
beside it overrides the preset, and ``translution plan --calibrate`` writes measured figures
for this machine. Bandwidths are per device and per direction, in bytes/s; latencies are per
ring step of a collective, in seconds.

GPU presets carry datasheet peaks and *assumed* efficiencies: nothing here was measured on a
GPU. ``kernel_efficiency`` (the Translution pair kernels' executed FLOP/s over the peak) and
``matmul_efficiency`` (dense linears) are set to 0.39, the fraction of ``sgemm`` the kernels
reach on the CPU at the 7×7 grid, the lowest of ``docs/benchmarks.md``'s measurements, until a
GPU measurement says otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

PresetName = Literal["h100_sxm", "a100_sxm_80gb", "nominal"]
ASSUMED_GPU_EFFICIENCY = 0.39
"""The kernels' measured fraction of the matmul rate on this project's CPU (7×7 grid; 47–53 % elsewhere)."""


@dataclass(frozen=True)
class Hardware:
    """Resolved figures of one device and the links it uses."""

    name: str
    peak_flops: float  # dense FLOP/s per device in the compute dtype (bf16 on GPUs, fp32 on CPUs)
    matmul_efficiency: float  # fraction of peak_flops that dense matmuls (linears) reach
    kernel_efficiency: float  # fraction of peak_flops that the pair kernels' executed FLOPs reach
    intra_node_bandwidth: float  # device ↔ device inside a node (NVLink; loopback for CPU processes)
    inter_node_bandwidth: float  # across nodes, per device (its share of the node's NICs)
    intra_node_latency: float
    inter_node_latency: float
    pcie_bandwidth: float  # host ↔ device copies (offload)
    nvme_bandwidth: float  # per device (a node's drives shared by its devices)
    memory_bandwidth: float  # device memory: the optimizer step on the device is memory-bound
    cpu_adam_params_per_s: float  # AdamW updates per second of one process's states on the host
    all_gather_efficiency: float = 1.0  # an all-gather's bytes/s as a fraction of an all-reduce's (ring bytes)
    reduce_scatter_efficiency: float = 1.0  # the same for a reduce-scatter (gloo's emulated one is far slower)


PRESETS: dict[str, Hardware] = {
    # NVIDIA H100 SXM5 80 GB datasheet: 989.4 TFLOP/s dense BF16, 3.35 TB/s HBM3, NVLink 4 900 GB/s
    # (both directions), PCIe Gen5 ×16 (64 GB/s a direction); DGX H100: one 400 Gb/s ConnectX-7 per GPU.
    "h100_sxm": Hardware("H100 SXM 80GB (datasheet; efficiencies assumed)", 989.4e12, ASSUMED_GPU_EFFICIENCY,
                         ASSUMED_GPU_EFFICIENCY, 450e9, 50e9, 5e-6, 10e-6, 64e9, 3e9, 3.35e12, 2e8),
    # NVIDIA A100 SXM4 80 GB datasheet: 312 TFLOP/s dense BF16, 2.039 TB/s HBM2e, NVLink 3 600 GB/s
    # (both directions), PCIe Gen4 ×16 (32 GB/s a direction); DGX A100: one 200 Gb/s ConnectX-6 per GPU.
    "a100_sxm_80gb": Hardware("A100 SXM 80GB (datasheet; efficiencies assumed)", 312e12, ASSUMED_GPU_EFFICIENCY,
                              ASSUMED_GPU_EFFICIENCY, 300e9, 25e9, 5e-6, 10e-6, 32e9, 3e9, 2.039e12, 2e8),
    # The planner's earlier nominal link figures (NVLink 150, network 25, PCIe 25, NVMe 3 GB/s), H100 compute.
    "nominal": Hardware("nominal links, H100 compute (datasheet; efficiencies assumed)", 989.4e12,
                        ASSUMED_GPU_EFFICIENCY, ASSUMED_GPU_EFFICIENCY, 150e9, 25e9, 5e-6, 10e-6, 25e9, 3e9,
                        3.35e12, 2e8),
}


class HardwareSection(BaseModel):
    """``cluster.hardware``: a preset and/or the figures themselves (bytes/s, s, FLOP/s)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: PresetName = Field("nominal", description="h100_sxm, a100_sxm_80gb (datasheets) or nominal; fields set "
                                                      "beside it override it (translution plan --calibrate writes them).")
    name: str | None = Field(None, description="What the figures describe (shown by plan).")
    peak_flops: float | None = Field(None, gt=0, description="Dense FLOP/s per device in the compute dtype.")
    matmul_efficiency: float | None = Field(None, gt=0, le=1, description="Fraction of peak dense matmuls reach.")
    kernel_efficiency: float | None = Field(None, gt=0, le=1,
                                            description="Fraction of peak the Translution kernels' executed FLOPs reach.")
    intra_node_bandwidth: float | None = Field(None, gt=0, description="Bytes/s per device and direction in a node.")
    inter_node_bandwidth: float | None = Field(None, gt=0, description="Bytes/s per device and direction across nodes.")
    intra_node_latency: float | None = Field(None, ge=0, description="Seconds per ring step inside a node.")
    inter_node_latency: float | None = Field(None, ge=0, description="Seconds per ring step across nodes.")
    pcie_bandwidth: float | None = Field(None, gt=0, description="Host ↔ device bytes/s per device.")
    nvme_bandwidth: float | None = Field(None, gt=0, description="NVMe bytes/s per device.")
    memory_bandwidth: float | None = Field(None, gt=0, description="Device memory bytes/s (the device optimizer).")
    cpu_adam_params_per_s: float | None = Field(None, gt=0, description="Host AdamW updates/s per process.")
    all_gather_efficiency: float | None = Field(None, gt=0, description="All-gather bytes/s over all-reduce bytes/s.")
    reduce_scatter_efficiency: float | None = Field(None, gt=0,
                                                    description="Reduce-scatter bytes/s over all-reduce bytes/s.")

    @model_validator(mode="after")
    def _known_preset(self) -> HardwareSection:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown hardware preset {self.preset!r}; use one of {', '.join(PRESETS)}")
        return self

    def resolve(self) -> Hardware:
        """The preset with every field set here taking precedence."""
        base = PRESETS[self.preset]
        values = {name: getattr(self, name) if getattr(self, name) is not None else getattr(base, name)
                  for name in Hardware.__dataclass_fields__}
        return Hardware(**values)


DATASHEET_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12),
    ("A100", 312e12), ("L40S", 362.05e12), ("B200", 2.25e15),
)
"""Dense BF16 FLOP/s (no sparsity) of NVIDIA datasheets, by a marker of ``torch.cuda.get_device_name``; first match wins."""
MATMUL_SIZE = 1024


def best_seconds(fn: Callable[[], Any], budget_s: float, least: int = 3) -> float:
    """The fastest of repeated calls of ``fn`` within about ``budget_s`` (at least ``least`` calls)."""
    fn()  # warm-up: allocations, plans, thread pools
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < least or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, budget_s: float = 0.25) -> float:
    """FLOP/s of the fastest of repeated ``MATMUL_SIZE³`` matmuls on ``device``: a host's practical peak."""
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype)

    def matmul() -> None:
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return 2 * MATMUL_SIZE ** 3 / best_seconds(matmul, budget_s)


def datasheet_bf16_peak(device_name: str) -> float | None:
    """The dense BF16 peak of a GPU named as ``torch.cuda.get_device_name`` names it, if it is in the table."""
    return next((flops for marker, flops in DATASHEET_BF16_PEAKS if marker in device_name), None)


def device_peak_flops(section: HardwareSection, device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The per-device peak MFU divides by, and where it comes from.

    An explicit ``cluster.hardware.peak_flops`` wins; a GPU is looked up by name in the
    datasheets (its BF16 dense peak, whatever the precision, as torchtitan does), else its
    preset; a CPU has no datasheet peak here, so its matmul rate in ``dtype`` is measured.
    """
    if section.peak_flops is not None:
        return section.peak_flops, "cluster.hardware.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if (flops := datasheet_bf16_peak(name)) is not None:
            return flops, f"{name}: datasheet dense BF16"
        return PRESETS[section.preset].peak_flops, f"{name}: not in the datasheet table, preset {section.preset}"
    return measured_matmul_flops(device, dtype), f"measured {MATMUL_SIZE}³ {str(dtype).removeprefix('torch.')} matmul"
