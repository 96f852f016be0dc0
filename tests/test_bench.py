"""tools/bench_pretrain.py: a toy-size run and its JSON schema, the reference's configuration against our model,
and its input errors (the FLOP model itself: test_flops.py). No timing is asserted."""
import json

import pytest
import torch

from expmae.model import create_model


@pytest.fixture(scope="module")
def bench(load_tool):
    return load_tool("bench_pretrain")


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_quick_run_prints_one_json_object_per_configuration(bench, keep_threads, capsys, tmp_path):
    out = tmp_path / "runs" / "bench.jsonl"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["config"] for r in records] == list(bench.CONFIGS)
    assert [json.loads(line) for line in out.read_text().splitlines()] == records  # the --out copy
    by_name = {r["config"]: r for r in records}
    for r in records:
        assert len(r["step_ms"]) == r["repeats"] == 2 and r["interleaved"] is True
        assert r["median_step_ms"] > 0 and r["median_cpu_ms"] >= 0 and r["min_step_ms"] <= r["median_step_ms"]
        assert r["clips_per_s"] == pytest.approx(r["batch_size"] / (r["median_step_ms"] / 1e3), rel=1e-4)
        assert r["tokens_per_s"] == pytest.approx(r["clips_per_s"] * r["tokens_per_clip"])
        assert r["ratio_to_reference"] > 0 and r["ratio_to_reference_cpu"] > 0 and r["ratio_of_medians"] > 0
        assert r["peak_memory_mb"] * 2**20 > r["params_m"] * 1e6 * 4 * 3  # weights + two AdamW moments, fp32
        assert r["mfu"] is None and r["peak_bf16_tflops"] is None  # CPU: no peak to compare with
        env = r["env"]
        assert env["device"] == "cpu" and env["threads"] == 1 and env["torch"] == torch.__version__
        assert r["dtype"] == "float32" and r["fused_adamw"] is True and r["compile"] is False
    reference = by_name["hf_videomae"]
    assert reference["ratio_to_reference"] == 1.0 and reference["implementation"].startswith("transformers.")
    assert reference["model_config"]["attn_implementation"] == "sdpa"
    assert by_name["expmae_unpacked"]["model_config"]["pack_branches"] is False
    assert by_name["expmae"]["model_config"]["pack_branches"] is True
    # the same model FLOPs for the same algorithm; two branches = the sum of the single-branch modes
    assert reference["model_flops_per_step"] == by_name["videomae"]["model_flops_per_step"]
    assert by_name["expmae"]["model_flops_per_step"] == pytest.approx(
        by_name["mae"]["model_flops_per_step"] + by_name["videomae"]["model_flops_per_step"])
    for r in records:  # time ratio = FLOP ratio / efficiency
        assert r["flops_ratio_to_reference"] == pytest.approx(
            r["model_flops_per_step"] / reference["model_flops_per_step"])
        assert r["efficiency_vs_reference"] == pytest.approx(r["flops_ratio_to_reference"] / r["ratio_to_reference"])
    assert by_name["expmae"]["encoder_tokens_per_clip"] == (
        by_name["mae"]["encoder_tokens_per_clip"] + by_name["videomae"]["encoder_tokens_per_clip"])


def test_reference_is_our_videomae_branch_in_transformers(bench):
    """Same architecture: HF's parameter count = ours in videomae mode minus the key biases HF does not have."""
    from transformers import VideoMAEForPreTraining

    model = create_model("small", img_size=32, num_frames=4, patch_size=8, mode="videomae")
    cfg, ours = model.cfg, sum(p.numel() for p in model.parameters())
    hf = VideoMAEForPreTraining(bench.hf_videomae_config(cfg))
    key_biases = cfg.depth * cfg.embed_dim + cfg.video_decoder_depth * cfg.video_decoder_embed_dim
    assert sum(p.numel() for p in hf.parameters()) == ours - key_biases
    hf_cfg = hf.config
    assert (hf_cfg.tubelet_size, hf_cfg.patch_size, hf_cfg.norm_pix_loss) == (2, 8, True)
    assert hf_cfg.decoder_num_hidden_layers == cfg.video_decoder_depth == 4
    assert hf_cfg._attn_implementation == "sdpa"


@pytest.mark.parametrize("argv, message", [
    (["--configs", "expmae,simclr"], "--configs 'expmae,simclr': expected a comma-separated subset"),
    (["--set", "img_sz=64"], "unknown ExpMAEConfig field(s) ['img_sz']"),
    (["--set", "decoder_depth"], "--set 'decoder_depth': expected key=value"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--repeats", "0"], ""),
])
def test_bad_arguments_exit_with_one_line_errors(bench, keep_threads, argv, message):
    with pytest.raises(SystemExit) as err:
        bench.main(["--quick", *argv])
    text = str(err.value)
    assert "\n" not in text and message in text and text


def test_bench_launchers_writes_one_launcher_per_configuration_that_accelerate_reads(load_tool, tmp_path):
    """tools/bench_launchers.py (its runs are too slow for CI): the launcher files it writes parse as accelerate
    configs of the intended kind and stage."""
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file

    bench = load_tool("bench_launchers")
    kinds = {}
    for name in (*bench.LAUNCHERS, "zero2_dsdefaults"):
        work = tmp_path / name
        work.mkdir()
        (work / "l.yaml").write_text(yaml.safe_dump(bench.launcher_yaml(name, 2, False, work)))
        cfg = load_config_from_file(str(work / "l.yaml"))
        kinds[name] = (cfg.distributed_type, (cfg.deepspeed_config or {}).get("zero_stage"), cfg.num_processes)
    assert kinds == {"ddp": ("MULTI_GPU", None, 2), "zero1": ("DEEPSPEED", 1, 2), "zero2": ("DEEPSPEED", 2, 2),
                     "zero3": ("DEEPSPEED", 3, 2), "zero2_dsdefaults": ("DEEPSPEED", None, 2)}
    ds = json.loads((tmp_path / "zero2_dsdefaults" / "ds.json").read_text())
    assert ds["zero_optimization"]["overlap_comm"] is False and ds["zero_optimization"]["reduce_bucket_size"] == 5e8
