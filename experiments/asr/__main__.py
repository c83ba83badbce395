"""Command line: ``python -m experiments.asr {download,synth,features,train,report} ...``.

    python -m experiments.asr download --data-dir data                     # LJ Speech 1.1, verified and extracted
    python -m experiments.asr train --decoder transformer --run-dir runs/transformer
    python -m experiments.asr train --decoder taylor --run-dir runs/taylor --resume
    torchrun --nproc_per_node 4 -m experiments.asr train --decoder lstm --run-dir runs/lstm
    python -m experiments.asr synth --out data/synth --clips 300            # LJ-layout corpus, no download
    python -m experiments.asr train --corpus-dir data/synth --max-frames 200 --max-chars 24 --width 64 ...
    python -m experiments.asr report runs/lstm runs/transformer runs/taylor
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.common.errors import report_expected_failure

from .models import ATTENTION_KINDS, CROSS_ATTENTION_KINDS, DECODERS, ModelConfig
from .train import MASK_PADDING, TrainConfig


def _optional_int(text: str):
    return None if text.lower() in ("none", "0", "") else int(text)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train, validate every epoch, test at the end")
    d = TrainConfig()
    m = ModelConfig()
    p.add_argument("--run-dir", default=d.run_dir)
    p.add_argument("--decoder", choices=DECODERS, default=m.decoder)
    p.add_argument("--encoder-attention", choices=ATTENTION_KINDS, default=m.encoder_attention,
                   help="attention of the encoder blocks (default: the course's softmax)")
    p.add_argument("--feature-dim", type=_optional_int, default=argparse.SUPPRESS,
                   help=f"q/k dims per head of Taylor and hybrid attention ('none' = head dim; default {m.feature_dim} like "
                        "Based); when given, the decoder's softmax attention takes it too (fair ablation: softmax with "
                        "Taylor's q/k width); not given, softmax keeps the head dim (the course)")
    p.add_argument("--cross-attention", choices=CROSS_ATTENTION_KINDS, default=None,
                   help="decoder cross-attention (default: taylor for --decoder taylor, softmax otherwise)")
    p.add_argument("--window", type=int, default=m.window, help="hybrid decoder: keys of the exact softmax window")
    p.add_argument("--mask-padding", choices=MASK_PADDING, default=TrainConfig.mask_padding,
                   help="mask padded encoder frames: auto (default) = on whenever a Taylor/hybrid attention is involved, "
                        "off (the course) otherwise")
    p.add_argument("--backend", default=m.backend, help="linattn_cuda backend of Taylor attention")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=d.data_dir, help="LJ Speech is downloaded/extracted below this folder")
    g.add_argument("--corpus-dir", default=None, help="a folder in LJ Speech layout to use instead (e.g. from `synth`)")
    g.add_argument("--no-download", dest="download", action="store_false")
    g.add_argument("--url", default=d.url)
    g.add_argument("--checksum", dest="sha256", default=d.sha256, help="expected sha256 of the archive ('none' to skip)")
    g.add_argument("--cache-dir", default=None)
    g.add_argument("--mel-rate", dest="filterbank_rate", type=_optional_int, default=d.filterbank_rate,
                   help="sample rate the mel filterbank is built for: 16000 = the course's quirk (default); 'none' = the audio's rate")
    g.add_argument("--max-frames", type=int, default=d.max_frames)
    g.add_argument("--max-chars", type=int, default=d.max_chars)
    g.add_argument("--limit-train", type=int, default=None)
    g.add_argument("--limit-eval", type=int, default=None)
    g = p.add_argument_group("model size")
    g.add_argument("--width", type=int, default=m.width)
    g.add_argument("--heads", type=int, default=m.heads)
    g.add_argument("--mlp", type=int, default=m.mlp)
    g.add_argument("--encoder-layers", type=int, default=m.encoder_layers)
    g.add_argument("--n-mels", type=int, default=m.n_mels)
    g = p.add_argument_group("optimization")
    for name in ("epochs", "batch_size", "eval_batch_size", "warmup_epochs", "decay_epochs", "seed"):
        g.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "weight_decay", "label_smoothing", "lr_floor"):
        g.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    g = p.add_argument_group("execution")
    g.add_argument("--device", default=d.device, choices=("auto", "cpu", "cuda"))
    g.add_argument("--no-amp", dest="amp", action="store_false", help="no bf16 autocast on GPU")
    g.add_argument("--num-workers", type=int, default=d.num_workers)
    g.add_argument("--resume", action="store_true",
                   help="continue from <run-dir>/checkpoint.pt; every setting that changes results must match the checkpoint's")
    g.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in --run-dir (default: refuse a non-empty folder)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--examples", type=int, default=d.examples)
    g.add_argument("--crash-after-epoch", type=int, default=None, help=argparse.SUPPRESS)


def _config(args) -> TrainConfig:
    model = ModelConfig(decoder=args.decoder, encoder_attention=args.encoder_attention, n_mels=args.n_mels,
                        width=args.width, heads=args.heads, mlp=args.mlp, encoder_layers=args.encoder_layers,
                        backend=args.backend, cross_attention=args.cross_attention, window=args.window)
    if hasattr(args, "feature_dim"):  # given: Taylor/hybrid and the decoder's softmax attention
        model.feature_dim = model.softmax_feature_dim = args.feature_dim
    keys = set(TrainConfig.__dataclass_fields__) - {"model"}
    values = {k: getattr(args, k) for k in keys if hasattr(args, k)}
    if isinstance(values.get("sha256"), str) and values["sha256"].lower() == "none":
        values["sha256"] = None
    return TrainConfig(model=model, **values)


PROG = "python -m experiments.asr"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("download", help="download, verify and extract LJ Speech 1.1")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--url", default=TrainConfig.url, help="the archive: an http(s) URL (a mirror), a file:// URL or a local path")
    p.add_argument("--checksum", default=TrainConfig.sha256,
                   help="expected sha256 of the archive ('none' to skip; the official archive's size and 13,100 clips are checked anyway)")
    p.add_argument("--retries", type=int, default=8, help="attempts after failures in a row without new data (default %(default)s)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without an answer or data before an attempt fails")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p = sub.add_parser("synth", help="write a synthetic corpus in LJ Speech layout (tones, or espeak-ng speech)")
    p.add_argument("--out", required=True)
    p.add_argument("--engine", choices=("tones", "espeak"), default="tones",
                   help="tones: one tone per character (fast tests); espeak: real English sentences spoken by espeak-ng")
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--voices", default=None, help="espeak: comma-separated espeak-ng voices (default: experiments.asr.espeak.VOICES)")
    p.add_argument("--rates", default=None, help="espeak: comma-separated speaking rates, words per minute (default 130,150,170,190)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="espeak: shortest clip (a shorter one is spoken slower)")
    p.add_argument("--max-seconds", type=float, default=8.0, help="espeak: longest clip (a longer one is spoken faster)")
    p.add_argument("--min-words", type=int, default=2)
    p.add_argument("--max-words", type=int, default=4)
    p.add_argument("--char-seconds", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("features", help="compute the feature cache of a corpus")
    p.add_argument("--corpus-dir", required=True)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--mel-rate", type=_optional_int, default=16000)
    p.add_argument("--max-frames", type=int, default=2754)
    _train_parser(sub)
    p = sub.add_parser("report", help="one results table for several run folders")
    p.add_argument("runs", nargs="+")
    p.add_argument("--out", default=None, help="also write the table to this file")
    return parser


def main(argv=None) -> int:
    """Run one subcommand; an expected failure (missing data, network, checksum, run folder, missing optional
    package) prints one line ``... error: <message>`` and returns 2, anything else keeps its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except Exception as e:
        code = report_expected_failure(e, PROG)
        if code is None:
            raise
        return code


def _run(args) -> int:
    if args.command == "download":
        from .data import prepare_ljspeech

        sha = None if args.checksum and args.checksum.lower() == "none" else args.checksum
        print(prepare_ljspeech(Path(args.data_dir), url=args.url, sha256=sha, progress=args.progress, retries=args.retries,
                               timeout=args.timeout))
    elif args.command == "synth" and args.engine == "espeak":
        from .espeak import RATES, VOICES, make_espeak_corpus

        out = make_espeak_corpus(Path(args.out), clips=args.clips, seed=args.seed,
                                 voices=args.voices.split(",") if args.voices else VOICES,
                                 rates=[int(r) for r in args.rates.split(",")] if args.rates else RATES,
                                 min_seconds=args.min_seconds, max_seconds=args.max_seconds)
        print(out)
        print((out / "corpus.json").read_text(), end="")
    elif args.command == "synth":
        from .synthetic import make_corpus

        print(make_corpus(Path(args.out), clips=args.clips, min_words=args.min_words, max_words=args.max_words,
                          char_seconds=args.char_seconds, seed=args.seed))
    elif args.command == "features":
        from .data import FeatureStore
        from .features import FrontEndConfig

        store = FeatureStore.build(Path(args.corpus_dir), FrontEndConfig(filterbank_rate=args.mel_rate, max_frames=args.max_frames),
                                   Path(args.cache_dir) if args.cache_dir else None)
        print(store.folder)
    elif args.command == "train":
        from .train import train

        train(_config(args))
    elif args.command == "report":
        from .report import combine

        table = combine([Path(r) for r in args.runs])
        print(table, end="")
        if args.out:
            Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
