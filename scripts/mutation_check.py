"""The mutation check: is every claimed behaviour's test able to fail?

Each mutation below switches one behaviour off in the source (one exact, unique snippet replaced),
then runs the tests that claim that behaviour; at least one of them must fail. The source is
restored after each run (also on Ctrl-C or SIGTERM), and a mutation whose snippet is missing or not
unique fails the check, so the list cannot silently go stale. README's *Testing* section names the
claims; `MUTATIONS` is the one list of what protects them.

    python scripts/mutation_check.py             # every mutation, a table at the end (CI runs this)
    python scripts/mutation_check.py cancel-ignored ar-rows-swapped   # some, by name
    python scripts/mutation_check.py --list
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # one mutation's test run


@dataclass(frozen=True)
class Mutation:
    name: str
    claim: str  # what the tests claim, as README says it
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids; at least one must fail


LOAD, FAULTS, HTTP = "tests/test_server_load.py", "tests/test_server_faults.py", "tests/test_server_http.py"
CORE = "tests/test_server_core.py"
EXPORT, QUANT = "tests/test_export_package.py", "tests/test_quantize.py"
ENVELOPE, MEMORY, CONNECTIONS = "tests/test_envelope.py", "tests/test_server_memory.py", "tests/test_server_connections.py"

MUTATIONS: tuple[Mutation, ...] = (
    Mutation("cancel-ignored", "a client's cancel or disconnect stops its generation's work",
             "server/context.py", "-> None:\n        with self._lock:\n            if self._error is not None:",
             "-> None:\n        return\n        with self._lock:\n            if self._error is not None:",
             (f"{LOAD}::test_cancelled_stream_stops_the_work", f"{FAULTS}::test_client_that_disconnects_mid_stream",
              f"{HTTP}::test_a_client_leaving_mid_stream_stops_its_generation",
              "tests/test_server_batching.py::test_concurrent_requests_share_ar_steps_and_keep_their_results")),
    Mutation("worker-never-checks", "the worker stops between AR tokens / denoising steps on a cancel or deadline",
             "server/glm_image_model.py", "ctx.check()  # raising here stops the pipeline", "pass  # ctx.check()",
             (f"{LOAD}::test_client_deadline_stops_the_work", f"{LOAD}::test_cancelled_stream_stops_the_work")),
    Mutation("drain-does-not-wait", "SIGTERM drains the requests in flight before the server exits",
             "server/app.py", "drained = await asyncio.to_thread(self.state.admission.wait_idle, timeout)",
             "drained = True", (f"{LOAD}::test_sigterm_drains_in_flight_requests",)),
    Mutation("grpc-stats-ignore-name", "gRPC and HTTP answer metadata, config, statistics and errors alike",
             "server/kserve.py", "self.plane.model_statistics(request.name, request.version)",
             'self.plane.model_statistics("", request.version)',
             (f"{CORE}::test_grpc_and_http_describe_every_model_alike",)),
    Mutation("timeout-parameter-ignored", "Triton's timeout parameter is a deadline over gRPC and HTTP",
             "server/inference.py", 'timeout_us = parameters.pop("timeout", None)',
             'timeout_us = parameters.pop("timeout", None) and None',
             (f"{CORE}::test_timeout_parameter_is_a_deadline_over_grpc_too",
              f"{HTTP}::test_kserve_timeout_parameter_is_a_deadline")),
    Mutation("setting-not-passed", "a setting declared once reaches the pipeline from every front end",
             "server/glm_image_fields.py", 'for n in SETTINGS if n not in ("height", "width")}',
             'for n in SETTINGS if n not in ("height", "width", "do_sample")}',
             (f"{CORE}::test_a_declared_setting_reaches_every_front_end",)),
    Mutation("prompt-parameter-ignored", "a KServe parameter works like the input tensor of the same name",
             "server/glm_image_request.py", 'return value.encode("utf-8")', 'return b"a placeholder prompt"',
             ("tests/test_server_kserve.py::test_parameters_work_like_inputs_and_outputs_are_selectable",)),
    Mutation("compare-passes-unchecked", "export --verify fails when it compared nothing or not every output",
             "export/graph.py", '"passed": not problems and all(w["max_rel"] <= limit for w in worst.values())}',
             '"passed": all(w["max_rel"] <= limit for w in worst.values())}',
             (f"{EXPORT}::test_compare_fails_when_it_compares_nothing_or_not_every_output",)),
    Mutation("verify-error-understated", "export --verify reports the worst error it measured",
             "export/graph.py", 'w["max_rel"] = max(w["max_rel"], e["max_rel"])', 'w["max_rel"] = e["max_rel"]',
             (f"{EXPORT}::test_verify_reports_the_error_it_measures_and_fails_a_perturbed_graph",)),
    Mutation("quantise-thresholds-ignored", "a quantisation below its thresholds fails and writes nothing",
             "quantize/package.py", "failures = options.thresholds.failures(report)", "failures = []",
             (f"{QUANT}::test_threshold_failure_writes_nothing",)),
    Mutation("psnr-threshold-ignored", "each quality threshold fails the measure below it",
             "quantize/quality.py", 'if self.min_psnr is not None and fixed and fixed["psnr_db_min"] < self.min_psnr:',
             "if False:", (f"{QUANT}::test_thresholds_fail_each_measure_below_its_bound",)),
    Mutation("int4-is-2-bit", "each recipe's image quality is held to its measured bound",
             "quantize/graphs.py", "MatMulNBitsQuantizer(model, bits=4, block_size=block_size",
             "MatMulNBitsQuantizer(model, bits=2, block_size=block_size",
             (f"{QUANT}::test_recipe_writes_a_package_the_runtime_runs[int4-weight]",)),
    Mutation("fp16-unclamped", "fp16 conversion clamps weights beyond +-65504",
             "export/precision.py", "min_positive_val=FP16_MIN_POSITIVE, max_finite_val=FP16_MAX,",
             'min_positive_val=FP16_MIN_POSITIVE, max_finite_val=float("inf"),',
             (f"{QUANT}::test_fp16_clamps_weights_beyond_its_range",)),
    Mutation("fp16-norms-through-half", "fp16 packages keep a norm's statistics in fp32",
             "export/precision.py", "drop_half_round_trips(converted.graph)", "pass",
             (f"{QUANT}::test_fp16_keeps_a_norms_variance_fp32",)),
    Mutation("reduce-range-ignored", "int8 on AVX2 without VNNI quantises weights to 7 bits",
             "quantize/graphs.py", "reduce_range=reduce, weight_type=QuantType.QInt8,",
             "reduce_range=False, weight_type=QuantType.QInt8,",
             (f"{QUANT}::test_reduce_range_quantises_weights_to_7_bits",)),
    Mutation("calibration-method-ignored", "--calibrate-method entropy / percentile set other ranges than minmax",
             "quantize/graphs.py", "calibrate_method=method, calibration_providers",
             "calibrate_method=CalibrationMethod.MinMax, calibration_providers",
             (f"{QUANT}::test_calibration_methods_set_different_activation_ranges",)),
    Mutation("bf16-not-refused", "quantising a bf16 package is refused with a clear error",
             "quantize/package.py", 'if target.dtype == "bf16":', "if False:",
             (f"{QUANT}::test_bf16_package_is_refused_with_a_clear_error",)),
    Mutation("vae-tiles-not-blended", "the tiled VAE blends its tiles as diffusers does",
             "runtime/images.py", "k = min(a.shape[axis], b.shape[axis], extent)", "k = 0",
             ("tests/test_runtime_preprocessing.py::test_tiling_loop_is_diffusers_tiling_exactly",)),
    Mutation("admission-limit-ignored", "a request over max-concurrency + max-queue is RESOURCE_EXHAUSTED",
             "server/admission.py", "if self._in_flight >= limit:", "if False:",
             ("tests/test_server_load.py::test_over_the_limit_is_resource_exhausted_and_cancel_stops_the_work",)),
    Mutation("ar-rows-swapped", "AR batching: each row keeps the tokens it gets alone",
             "runtime/ar_batch.py", "for row, token in zip(rows, tokens):", "for row, token in zip(rows, tokens[::-1]):",
             ("tests/test_ar_batch.py::test_rows_join_and_leave_a_running_batch_and_keep_their_tokens",)),
    Mutation("glyph-text-wrong", "the glyph encoder gets the prompt's quoted text, as diffusers gives it",
             "runtime/glyphs.py", "return [t for pattern in _GLYPH_PATTERNS", "return [t.lower() for pattern in _GLYPH_PATTERNS",
             ("tests/test_runtime_parity.py::test_text_to_image_matches_diffusers[cpu-64-64]",)),
    Mutation("memory-modes-off", "each CPU session allocates as its memory mode says (arena, pattern, exact)",
             "runtime/providers.py", "so.enable_cpu_mem_arena, so.enable_mem_pattern = MEMORY_MODES[memory]",
             "so.enable_cpu_mem_arena, so.enable_mem_pattern = True, True",
             ("tests/test_providers.py::test_cpu_session_runs",
              "tests/test_providers.py::test_release_names_only_the_arenas_a_session_has")),
    Mutation("vae-auto-tiling-off", "vae_tiling auto tiles an image larger than one tile (bounded memory)",
             "runtime/pipeline.py", 'return self.vae_tiling == "on" or (self.vae_tiling == "auto" and max(height, width) > tile)',
             'return self.vae_tiling == "on"',
             ("tests/test_runtime_preprocessing.py::test_vae_tiling_option",
              "tests/test_runtime_preprocessing.py::test_tiled_vae_decode_matches_diffusers")),
    Mutation("demo-layout-dropped", "the demo model draws the prompt's word (OCR reads it back)",
             "runtime/pipeline.py", '"prior_token_drop": np.repeat(np.array(drop_rows)[:, None], n, axis=1),',
             '"prior_token_drop": np.ones((len(drop_rows), n), bool),',
             ("tests/test_demo_model.py::test_runtime_draws_the_signs",)),
    # issue 30: memory and slow clients
    Mutation("envelope-not-enforced", "a component model refuses shapes the pipeline never sends",
             "server/models.py", "error = bound.error(name, inputs[name].shape)", "error = None",
             (f"{ENVELOPE}::test_the_server_refuses_component_calls_beyond_the_envelope",)),
    Mutation("budget-not-reserved", "a request past the memory budget is refused before it runs",
             "server/admission.py", "self.memory.reserve(memory)", "pass",
             (f"{MEMORY}::test_a_request_past_the_budget_is_refused_before_it_runs",
              f"{MEMORY}::test_requests_in_flight_hold_their_estimate")),
    Mutation("header-timeout-off", "a client that never finishes its headers is cut off",
             "server/http_server.py", "        if self._deadline is None:\n", "        if False:\n",
             (f"{CONNECTIONS}::test_a_client_that_never_finishes_its_headers_is_cut_off",)),
    Mutation("body-timeout-off", "a stalled request body gets 408",
             "server/http_server.py", "await asyncio.wait_for(chunks.__anext__(), self.connection.body_timeout)",
             "await chunks.__anext__()", (f"{CONNECTIONS}::test_a_stalled_body_gets_408",)),
    Mutation("body-budget-off", "the request bodies held at once are bounded",
             "server/http_server.py", "if self.body_bytes + size - held > budget:", "if False:",
             (f"{CONNECTIONS}::test_bodies_held_at_once_are_bounded",)),
    Mutation("drain-timeout-unanswered", "requests past the drain timeout are answered in their protocol's shape",
             "server/app.py", "abandoned = self.state.admission.abandon(", "abandoned = 0 and self.state.admission.abandon(",
             (f"{CONNECTIONS}::test_requests_past_the_drain_timeout_are_answered_in_their_protocols_shape",)),
    Mutation("log-not-escaped", "a client's string cannot split or forge a log line",
             "server/wire.py", "    if _PLAIN.fullmatch(text) and len(text) <= MAX_LOGGED_CHARS:", "    if True:",
             ("tests/test_server_malformed.py::test_a_client_newline_cannot_split_a_log_line",)),
)


def _pytest(tests: tuple[str, ...], cache: Path | None) -> tuple[int, list[str], str]:
    """Run `tests` in a fresh process (no bytecode written, so a mutant never lands in __pycache__);
    the exit code, the failed node ids and the output's tail. `cache`: the test packages' cache
    (tests/conftest.py build_package), or None to export afresh."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("GLM_IMAGE_ONNX_TEST_PACKAGE_CACHE", None)
    if cache is not None:
        env["GLM_IMAGE_ONNX_TEST_PACKAGE_CACHE"] = str(cache)
    try:  # a test that hangs under a mutant must not hang CI
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:randomly", *tests],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return 124, [], f"the tests ran past {TIMEOUT_S} s"
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
    return proc.returncode, failed, proc.stdout[-2000:] + proc.stderr[-1000:]


def run(mutation: Mutation, cache: Path) -> tuple[bool, str]:
    """Apply, test, restore. Caught when pytest reports failed tests (exit 1): an import error or a
    collection error (exit 2+) is the mutation breaking the code, not a test catching it. Test
    packages are exported once and shared, except while the exporter or the models are mutated."""
    path = ROOT / mutation.path
    source = path.read_text()
    if source.count(mutation.old) != 1:
        return False, f"snippet found {source.count(mutation.old)} times in {mutation.path} (must be once)"
    stat = path.stat()
    try:
        path.write_text(source.replace(mutation.old, mutation.new))
        # A new mtime, so that no cached bytecode of the original is taken for the mutant.
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 7_000_000_000))
        exporting = mutation.path.startswith(("export/", "models/", "glm_image_onnx/"))
        code, failed, tail = _pytest(mutation.tests, None if exporting else cache)
    finally:
        path.write_text(source)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    if code == 1 and failed:
        return True, ", ".join(f.split("::")[-1] for f in failed)
    return False, f"NOT CAUGHT (pytest exit {code})\n{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:28} {m.claim}")
        return 0
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        print(f"unknown mutation(s): {', '.join(unknown)} (--list shows them)", file=sys.stderr)
        return 2
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, through run()'s restore.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    rows, missed = [], 0
    cache = Path(tempfile.mkdtemp(prefix="mutation-check-"))
    try:
        for m in [by_name[n] for n in args.names] or MUTATIONS:
            t0 = time.perf_counter()
            caught, detail = run(m, cache)
            missed += not caught
            rows.append(f"| {m.name} | {m.claim} | {detail.splitlines()[0] if caught else 'NOT CAUGHT'} |")
            print(f"[mutation_check] {m.name}: {'caught by ' + detail if caught else detail} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    print("\n| mutation | claim | tests that caught it |\n|---|---|---|\n" + "\n".join(rows))
    print(f"\n{len(rows) - missed} of {len(rows)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
