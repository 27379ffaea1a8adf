"""Where the KL sits along a window, and what exact first positions buy (torch twin, GPU).

For each profile and effort: the mean KL per position over the windows of each set (calibration,
held-out, evaluation), and the variant ``sink P``: positions 0..P-1 of every window run exact,
the others at the effort e' that keeps the total multiplications at e of all
(e' = (e T - P) / (T - P)). A probe for issue 6, not a rule pyeffort ships.

python experiments/quality/quality_sink.py --gguf M.gguf --ids ids.npy --profiles a.json,b.json \
    --out-weights W.safetensors --out OUT.json
"""

from __future__ import annotations

import torch
import torch_search as S
import twin_probe as T

from pyeffort.models.profiles import allocation as A


def sink_product(sink: int, t_n: int):
    """Positions 0..sink-1 of every window exact, the others by the default rule."""

    def product(name, mat, x, e):
        head = torch.arange(x.shape[0], device=x.device) % t_n < sink
        y = torch.empty(x.shape[0], mat.n_out, device=x.device)
        y[head] = x[head] @ mat.w32
        y[~head], mults = mat(x[~head], e)
        return y, float(mults) + int(head.sum()) * mat.size

    return product


def by_position(kl: torch.Tensor) -> dict:
    """KL (B, T) -> its mean, and where along the window it sits."""
    per_pos = kl.mean(0)
    return {
        "kl": float(kl.mean()),
        "pos0": float(per_pos[0]),
        "pos1_7": float(per_pos[1:8].mean()),
        "pos8_": float(per_pos[8:].mean()),
        "share_first8": float(per_pos[:8].sum() / per_pos.sum()),
    }


def main(argv=None):
    p = T.parser(__doc__)
    p.add_argument("--profiles", required=True, help="comma-separated profile JSON files")
    p.add_argument("--sinks", default="0,1,4")
    args = p.parse_args(argv)
    model, bench = T.setup(args)
    t_n = args.length
    rows = T.Rows(args.out)
    for path in args.profiles.split(","):
        prof = A.load(path)
        for e in T.efforts(args):
            for sink in (int(v) for v in args.sinks.split(",")):
                eff = S.profile_efforts(model, prof, (e * t_n - sink) / (t_n - sink))
                kls, realised = T.kl_pass(model, bench, eff, sink_product(sink, t_n))
                row = {k: by_position(v) for k, v in kls.items()}
                rows.add({**row, "realised": realised, "profile": path, "effort": e, "sink": sink})
    rows.write()


if __name__ == "__main__":
    main()
