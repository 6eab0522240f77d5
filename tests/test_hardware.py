"""The per-device peak MFU divides by: an explicit figure, a GPU's datasheet, or a CPU's measured matmul."""

from __future__ import annotations

import pytest
import torch

from training.hardware import HardwareSection, datasheet_bf16_peak, device_peak_flops, measured_matmul_flops


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989.4e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA GeForce RTX 4090", None),
])
def test_gpu_peak_is_looked_up_by_device_name(name, peak):
    assert datasheet_bf16_peak(name) == peak


def test_explicit_peak_wins_over_detection():
    section = HardwareSection(peak_flops=123e9)
    assert device_peak_flops(section, torch.device("cpu"), torch.float32) == (123e9, "cluster.hardware.peak_flops")


def test_cpu_peak_is_measured_not_taken_from_a_gpu_preset():
    peak, source = device_peak_flops(HardwareSection(preset="h100_sxm"), torch.device("cpu"), torch.float32)
    assert "measured" in source and "float32" in source
    assert 1e8 < peak < 1e13  # a host's matmul rate, far below the preset's 989 TFLOP/s
    assert measured_matmul_flops(torch.device("cpu"), torch.float32, budget_s=0.05) > 1e8
