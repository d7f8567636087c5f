"""`taskvec data toxic` and `taskvec data split`: thin wrappers over taskvec.data."""

import click

from taskvec.cli.options import SEED, OneValueGroup


@click.group(cls=OneValueGroup)
def data():
    """Prepare training text: pick the toxic rows of a corpus, split them into N disjoint sets.

    \b
    Example (full scale, needs the Hugging Face hub once; the download is cached):
        taskvec data toxic civil_comments -o toxic.jsonl
        taskvec data split toxic.jsonl --splits 5 -o toxic-splits
        taskvec train-splits toxic-splits --base gpt2 -o runs
    """


@data.command()
@click.argument("source")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False),
              help="JSONL file to write, one {\"text\": ...} a line.")
@click.option("--text-column", default=None,
              help="Column holding the text [default: the corpus's own, else 'text'].")
@click.option("--score-column", default=None,
              help="Numeric column to filter on [default: toxicity for civil_comments, "
                   "roberta_prediction for toxigen, none for other sources].")
@click.option("--threshold", type=float, default=None,
              help="Keep rows whose score is strictly above this [default: 0.8 when there is a score column].")
@click.option("--split", "hub_split", default="train", show_default=True,
              help="Which split of a hub dataset to read.")
@click.option("--max-rows", type=click.IntRange(min=1), default=None,
              help="Keep at most this many texts (the first ones, in the source's order).")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def toxic(source, output, text_column, score_column, threshold, hub_split, max_rows, overwrite):
    """Write the toxic texts of SOURCE to a JSONL file.

    SOURCE is `civil_comments` (google/civil_comments, toxicity > 0.8), `toxigen`
    (skg/toxigen-data, roberta_prediction > 0.8), another hub dataset name, or a local
    .jsonl/.csv/.parquet file (a text column and an optional score column) or .txt file (one
    text a line). Hub datasets are read through `datasets.load_dataset`; offline, export the
    rows to a local file and pass that instead.

    \b
    Example:
        taskvec data toxic comments.csv --text-column comment_text \\
            --score-column toxicity -o toxic.jsonl
    """
    from taskvec.data import load_texts, write_jsonl
    from taskvec.output_file import check_output_file

    output = check_output_file(output, [source], overwrite)
    texts = load_texts(source, text_column=text_column, score_column=score_column,
                       threshold=threshold, split=hub_split, max_rows=max_rows)
    write_jsonl(texts, output)
    click.echo(f"wrote {len(texts)} texts to {output}")


@data.command()
@click.argument("input_file", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("--splits", "-n", "n_splits", type=click.IntRange(min=1), required=True,
              help="Number of disjoint splits N (sizes differ by at most one).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False),
              help="Directory to create: split-00.jsonl ... and splits.json.")
@click.option("--seed", type=SEED, default=0, show_default=True,
              help="Seed of the shuffle; the same seed and input give the same splits.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT if it exists.")
def split(input_file, n_splits, output, seed, overwrite):
    """Shuffle the texts of INPUT (a JSONL file from `taskvec data toxic`) into N disjoint splits.

    The output directory holds split-00.jsonl, split-01.jsonl, ... and a splits.json manifest
    (seed, sizes, sha256 of the input and of each split) that `taskvec train-splits` checks.
    """
    from taskvec.data import read_jsonl, save_splits

    paths = save_splits(read_jsonl(input_file), n_splits, output, seed,
                        source=str(input_file), overwrite=overwrite)
    click.echo(f"wrote {len(paths)} splits to {output}")
