"""`taskvec sweep`: a thin wrapper over taskvec.sweep.run.run_sweep (imported when run).

The evaluation options are `taskvec eval`'s own option objects, so both commands take the same
settings with the same defaults and checks.
"""

from pathlib import Path

import click

from taskvec.cli.evaluate import (
    CommaList,
    _make_scorer,
    _protocol_values,
    _split_scorer_options,
    eval_command,
)
from taskvec.cli.options import SEED

# taskvec eval's options that a sweep takes as they are (not --output, --seed, --no-*, --overwrite)
SHARED = ("ppl_file", "ppl_max_tokens", "stride", "max_length", "prompts_file", "num_prompts", "samples",
          "max_new_tokens", "top_p", "top_k", "temperature", "batch_size", "protocol", "device", "scorer",
          "threshold", "detoxify_model", "detoxify_checkpoint", "detoxify_config", "perspective_config",
          "perspective_qps", "hf_label", "hf_tokenizer", "hf_batch_size", "progress")


class _Seeds(CommaList):
    def convert(self, value, param, ctx):
        return [SEED.convert(seed, param, ctx) for seed in super().convert(value, param, ctx)]


@click.command()
@click.argument("finetuned", nargs=-1, required=True)
@click.option("--base", required=True, help="The base model the fine-tunes started from (directory or hub id).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Sweep directory; an existing one is resumed (finished points are skipped).")
@click.option("--methods", type=CommaList(str, "method"), default="merged,single", show_default=True,
              help="merged: negate the mean of all FINETUNED; single: negate one model (--single).")
@click.option("--scales", type=CommaList(float, "number"), required=True,
              help="Scales (lambda) to sweep, e.g. 0.1,0.25,0.5,1; the base (scale 0) is always included.")
@click.option("--seeds", type=_Seeds(int, "integer"), default="0,1,2,3", show_default=True,
              help="Sampling seeds: toxicity is measured once per seed, perplexity once per model.")
@click.option("--single", default=None,
              help="The model the single method negates: any fine-tune, e.g. one trained on all the data "
                   "[default: the first FINETUNED].")
@click.option("--prompt-seed", type=SEED, default=None,
              help="Seed of the prompt sample, the same for every point [default: the protocol's, 0 (paper: 42)].")
@click.option("--keep-models", is_flag=True,
              help="Keep each model under OUTPUT/models [default: delete it once evaluated; models can be large].")
def sweep(finetuned, base, output, methods, scales, seeds, single, prompt_seed, keep_models, ppl_file,
          prompts_file, num_prompts, protocol, scorer, device, progress, **options):
    """Evaluate negated task vectors over a range of scales, at several sampling seeds.

    \b
    For each method (merged, single) and scale, builds the model (one read
    of the inputs for all scales), measures its perplexity once and its
    toxicity once per seed, with `taskvec eval`'s settings; the base is
    the shared point at scale 0. Writes OUTPUT/sweep.csv (a row per
    method x scale x seed, and mean and SD rows) and OUTPUT/sweep.png
    (perplexity against toxicity, one curve per method). Compare the
    methods at matched toxicity with `taskvec compare --matched OUTPUT`.

    Example: taskvec sweep runs/split-* --base gpt2 -o sweep --scales 0.1,0.25,0.5,1 --seeds 0,1,2,3
    """
    from taskvec.eval import load_ppl_texts, load_prompts
    from taskvec.sweep.run import check_grid, run_sweep
    from taskvec.sweep.table import format_means

    check_grid(methods, scales, seeds)
    scorer_options = _split_scorer_options(options)
    options.update(_protocol_values(protocol))
    protocol_seed = options.pop("seed")
    prompt_seed = protocol_seed if prompt_seed is None else prompt_seed
    scorer_obj = _make_scorer(scorer, device, **scorer_options)
    prompts = load_prompts(prompts_file, n=num_prompts, seed=prompt_seed)
    ppl_texts = load_ppl_texts(ppl_file)
    resolved = [str(Path(file).resolve()) for file in ppl_file]  # a resume from another directory is the same sweep
    settings = {"protocol": protocol,
                "prompts": str(Path(prompts_file).resolve()) if prompts_file else
                "allenai/real-toxicity-prompts (challenging)",
                "prompt_seed": prompt_seed, "ppl_texts": resolved or "wikitext-103-raw-v1 (test)"}
    result = run_sweep(output, base=base, finetuned=finetuned, methods=methods, scales=scales, seeds=seeds,
                       single=single, ppl_texts=ppl_texts, prompts=prompts, scorer=scorer_obj, evaluation=options,
                       settings=settings, keep_models=keep_models, device=device, progress=progress,
                       echo=click.echo)
    click.echo(format_means(result.rows))
    click.echo(f"wrote {result.csv}, {result.plot}")


sweep.params += [param for param in eval_command.params if param.name in SHARED]
