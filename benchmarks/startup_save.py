"""Start-up and checkpoint-save time of a training run, full-size model on the CPU.

    python benchmarks/startup_save.py --work_dir /tmp/jaxmm_startup [--out result.json]

Builds the training run the way ``jaxmm.training.loop`` does (config checks, prepared data,
tokenizer, model, optimizer, then the initial state: fresh, and again as a resume from the
checkpoint the fresh run saved) with ResNet-50 + DistilBERT at 224 px / 32 tokens, random
init, on a small synthetic dataset (prepared once, not timed). Reports seconds for: fresh
start-up, resumed start-up, the blocking part of a checkpoint save and the save until it is
on disk (the first save of the run, and a second one).
"""

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_config(work_dir: str):
    """The demo config with the full-size towers (random init) and a small batch."""
    from configs import demo

    c = demo.get_config()
    c.data_dir, c.prepared_dir = os.path.join(work_dir, "data"), os.path.join(work_dir, "prep")
    c.model.image_arch, c.model.text_arch = "resnet50", "distilbert"
    c.image_size, c.stored_image_size, c.max_text_length = 224, 256, 32
    c.batch_size = c.eval_batch_size = 8
    return c


def measure(work_dir: str) -> dict:
    """Times fresh start-up, one save, and resumed start-up; returns seconds."""
    import jax

    from jaxmm.training import loop

    config = make_config(work_dir)
    loop.build(config, "")  # prepares the data once: not timed
    workdir = os.path.join(work_dir, "run")
    shutil.rmtree(workdir, ignore_errors=True)
    out = {}
    for attempt in ("fresh", "resume"):
        start = time.perf_counter()
        run = loop._Run(config, workdir, loop.build(config, workdir))
        jax.block_until_ready(run.state)
        out[f"startup_{attempt}_s"] = round(time.perf_counter() - start, 2)
        if attempt == "fresh":
            run.iter_state = run.train_iter.get_state()
            start = time.perf_counter()
            run.save()
            out["save_call_s"] = round(time.perf_counter() - start, 2)
            run.ckpts.wait()
            out["save_total_s"] = round(time.perf_counter() - start, 2)
            run.step += 1  # A second save (a later step) runs what the first one compiled.
            start = time.perf_counter()
            run.save()
            out["save_again_call_s"] = round(time.perf_counter() - start, 2)
            run.ckpts.wait()
            out["save_again_total_s"] = round(time.perf_counter() - start, 2)
        run.ckpts.close()
        run.train_iter.close()
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work_dir", required=True, help="data, prepared data and the run go here")
    p.add_argument("--out", default="", help="also write the JSON result here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    result = {"machine": f"{os.cpu_count()}-core CPU", **measure(args.work_dir)}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
