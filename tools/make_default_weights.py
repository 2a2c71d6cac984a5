"""Regenerate the packaged default model (``ns_plugin/_data/vit_digits_s0_e30.safetensors``).

    python tools/make_default_weights.py [--out PATH]

Trains :func:`ns_plugin.train_default_model` (seed 0, 30 epochs, one intra-op thread) and writes the weights
as safetensors with the metrics as metadata; prints the SHA-256 to record in
``ns_plugin.embedded.PACKAGED_SHA256``. Training is not bit-identical across machines (float rounding), which
is why the result is checked in instead of trained at first use.
"""
import argparse
import json

import torch


def main() -> None:
    from ns_plugin.embedded import packaged_weights_path, train_default_model, write_packaged_default
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(packaged_weights_path()))
    a = p.parse_args()
    torch.set_num_threads(1)
    model, metrics = train_default_model(seed=0, epochs=30, progress=True)
    sha = write_packaged_default(a.out, model, metrics, seed=0, epochs=30, torch=torch.__version__,
                                 recipe="ns_plugin.embedded.train_default_model(seed=0, epochs=30), 1 thread")
    print(json.dumps({"out": a.out, "sha256": sha, **{k: round(v, 4) for k, v in metrics.items()}}))


if __name__ == "__main__":
    main()
