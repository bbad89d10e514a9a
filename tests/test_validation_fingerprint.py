"""The environment fingerprint records the versions that are actually imported here, and the CPU's instruction-set
features (read from /proc/cpuinfo: checked on hand-written cpuinfo texts)."""

from __future__ import annotations

import importlib.util
import json
import platform
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from fairdeploy.validation import fingerprint
from fairdeploy.validation.fingerprint import (
    ISA_FEATURES,
    cpu_isa,
    cpu_model,
    environment_fingerprint,
    package_version,
)

# Abridged /proc/cpuinfo texts (two processors each; the second's flags must not be read). Real lines, cut down.
SAPPHIRE_RAPIDS = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse4_1 sse4_2 fma f16c avx2 avx512f avx512dq avx512bw avx512vl avx_vnni avx512_bf16 avx512_vnni \
amx_bf16 avx512_fp16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse4_1
"""
EPYC_ZEN2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu sse4_1 sse4_2 fma f16c avx2 sha_ni
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu sse4_1 sse4_2 fma f16c avx2 sha_ni avx512f
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
"""


def test_versions_match_the_imported_packages() -> None:
    fp = environment_fingerprint()
    pk = fp["packages"]
    assert pk["numpy"] == np.__version__
    assert str(torch.__version__).startswith(pk["torch"].split("+")[0])
    assert pk["onnxruntime"] == onnxruntime.__version__
    assert fp["python"] == platform.python_version()
    assert (pk["tensorrt"] is None) == (importlib.util.find_spec("tensorrt") is None)
    assert fp["onnxruntime_available_providers"] == onnxruntime.get_available_providers()
    assert (fp["gpu"] is None) == (not torch.cuda.is_available())
    assert fp["cpu"]["torch_threads"] == torch.get_num_threads()
    json.dumps(fp)  # serialisable as is


def test_cpu_model_and_unknown_package() -> None:
    model = cpu_model()
    assert model and ":" not in model
    assert package_version(("surely-not-an-installed-distribution",)) is None
    assert package_version(("surely-not-installed", "numpy")) == np.__version__


def test_cpu_isa_reads_the_first_flags_line() -> None:
    intel = cpu_isa(SAPPHIRE_RAPIDS)
    assert intel is not None and list(intel) == list(ISA_FEATURES)
    assert all(intel.values())  # this Xeon has every feature on the list
    amd = cpu_isa(EPYC_ZEN2)
    assert {k for k, v in amd.items() if v} == {"avx2", "fma", "f16c"}  # not the second processor's avx512f
    assert not any(cpu_isa(GRAVITON).values())  # ARM: a Features line, none of these x86 features
    assert cpu_isa("processor\t: 0\nmodel name\t: something\n") is None  # no flags line: unknown, not "none"
    assert cpu_isa("") is None


def test_cpu_record_reads_this_machine_and_falls_back_without_proc(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    fp = environment_fingerprint()["cpu"]
    if fingerprint.CPUINFO.is_file():
        assert fp["isa"] == cpu_isa(fingerprint.CPUINFO.read_text(errors="replace"))
    assert fp["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    fake = tmp_path / "cpuinfo"
    fake.write_text(EPYC_ZEN2)
    monkeypatch.setattr(fingerprint, "CPUINFO", fake)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    cpu = environment_fingerprint()["cpu"]
    assert cpu["model"] == "AMD EPYC 7B12" and cpu["isa"]["avx2"] and not cpu["isa"]["avx512_vnni"]
    assert cpu["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    monkeypatch.setattr(fingerprint, "CPUINFO", tmp_path / "absent")  # macOS, Windows: no /proc/cpuinfo
    cpu = environment_fingerprint()["cpu"]
    assert cpu["isa"] is None and cpu["model"] == (platform.processor() or platform.machine())
    json.dumps(cpu)
