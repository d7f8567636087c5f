"""Which bytes of which input each output tensor is made of: inputs matched to the reference.

The reference is inputs[0] (the base, or the first fine-tune of an average): its tensors, under
their canonical names (taskvec.io.names), are the output's. Every other input must hold each of
them with the same shape, as a tensor of its own, the tied input embedding, or (a LoRA adapter)
base + delta. Every problem is raised here, before an output byte exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from taskvec.errors import TaskvecError
from taskvec.io.checkpoint import Checkpoint
from taskvec.io.layout import INPUT_EMBEDDINGS, LEGACY_BUFFERS, TIED_OUTPUT
from taskvec.io.names import naming_rules
from taskvec.io.peft_adapter import LoraDelta, LoraSource
from taskvec.io.safetensors_file import FileReader, TensorEntry


@dataclass
class Matched:
    """Per output tensor, one source per input (file range or LoRA source), in input order."""

    sources: dict[str, list[TensorEntry | LoraSource]]
    notes: list[str] = field(default_factory=list)  # what was renamed, dropped or left out
    extras: dict[str, list[str]] = field(default_factory=dict)  # input label -> tensors left out


def match_inputs(inputs: list[Checkpoint], *, strict: bool = False) -> Matched:
    """Match every input's tensors to the reference's by canonical name. `strict` refuses
    fine-tune tensors the reference does not have instead of leaving them out."""
    notes: list[str] = []
    tensors = _canonical_tensors(inputs, notes)
    reference = inputs[0]
    if reference.adapter is not None:
        raise TaskvecError(f"{reference.path}: a LoRA adapter cannot be the base; pass the model it was "
                           "trained from as --base and the adapter as a fine-tune")
    ref_tensors = tensors[0]
    ref_tied = reference.ties_embeddings is not False
    transposed = _transposed_modules(inputs) if any(c.adapter for c in inputs) else None
    sources: dict[str, list] = {name: [entry] for name, entry in ref_tensors.items()}
    extras: dict[str, list[str]] = {}
    for checkpoint, named in zip(inputs[1:], tensors[1:], strict=True):
        if checkpoint.adapter is not None:
            notes.extend(_match_adapter(reference, ref_tensors, ref_tied, checkpoint, named, sources, transposed))
        else:
            found = _match(reference, ref_tensors, ref_tied, checkpoint, named, sources)
            if found:
                extras[checkpoint.label] = found
    _extras_note(extras, strict, notes)
    return Matched(sources, notes, extras)


def _canonical_tensors(inputs: list[Checkpoint], notes: list[str]) -> list[dict[str, object]]:
    """Each input's tensors under the names the architecture loads them by (taskvec.io.names):
    only consulted when names disagree or legacy buffers are present, as that costs imports."""
    named = [dict(c.tensors) | (dict(c.adapter.deltas) if c.adapter else {}) for c in inputs]
    reference = set(named[0]) - {TIED_OUTPUT}
    if all(set(n) - {TIED_OUTPUT} <= reference if c.adapter else set(n) - {TIED_OUTPUT} == reference
           for c, n in zip(inputs, named, strict=True)) \
            and not any(LEGACY_BUFFERS.search(name) for n in named for name in n):
        return named
    configs = [c.config for c in inputs if c.adapter is None and c.config.get("model_type")]
    config = next((c for c in configs if c.get("architectures")), configs[0] if configs else {})
    rules, why_not = naming_rules(config)
    if rules is None:
        notes.append(f"tensor names differ between inputs, and {why_not}: names are matched as they are")
        return named
    result = []
    for checkpoint, tensors in zip(inputs, named, strict=True):
        canonical, renamed, dropped = {}, 0, []
        for name, entry in tensors.items():
            new = rules.canonical(name)
            if new is None:
                dropped.append(name)
                continue
            renamed += new != name
            if new in canonical:
                where = entry.a.path if isinstance(entry, LoraDelta) else entry.path
                raise TaskvecError(f"{where}: tensors '{name}' and another one both load as '{new}' "
                                   f"in {rules.architecture}")
            canonical[new] = replace(entry, target=new) if isinstance(entry, LoraDelta) else entry
        if renamed:
            notes.append(f"{checkpoint.label}: {renamed} tensors renamed to {rules.architecture}'s current names "
                         f"(prefix '{rules.prefix}.')")
        if dropped:
            notes.append(f"{checkpoint.label}: {len(dropped)} buffers that transformers drops on load left out "
                         f"({_listing(dropped)})")
        result.append(canonical)
    return result


def _transposed_modules(inputs: list[Checkpoint]) -> frozenset[str] | None:
    """The modules whose weights the architecture stores (in, out), for LoRA deltas: PEFT decides
    the transposition per module type, but saves one fan_in_fan_out flag for the whole adapter."""
    configs = [c.config for c in inputs if c.adapter is None and c.config.get("model_type")]
    rules, _ = naming_rules(configs[0]) if configs else (None, None)
    return rules.transposed if rules is not None else None


def _match(reference, ref_tensors, ref_tied, checkpoint, tensors, sources) -> list[str]:
    """Add a full fine-tune's entries to `sources`; returns its tensors the base does not have."""
    if ref_tied and checkpoint.ties_embeddings is False and TIED_OUTPUT in tensors:
        raise TaskvecError(f"{checkpoint.path}: its output embedding '{TIED_OUTPUT}' is its own (config: "
                           f"tie_word_embeddings false), but {reference.path} ties it to the input embedding; "
                           "the merge would lose the fine-tune's head: untie the base first")
    tied = checkpoint.ties_embeddings if checkpoint.ties_embeddings is not None else ref_tied
    embedding = next((n for n in INPUT_EMBEDDINGS if n in tensors), None)
    if tied and TIED_OUTPUT in tensors and TIED_OUTPUT not in ref_tensors and embedding \
            and not _same_bytes(tensors[TIED_OUTPUT], tensors[embedding]):
        raise TaskvecError(f"{checkpoint.path}: its output embedding '{TIED_OUTPUT}' holds other values than its input "
                           f"embedding '{embedding}' although its config ties them (transformers then loads it "
                           f"untied), but {reference.path} ties them; the merge would lose the fine-tune's head: "
                           "untie the base first")
    for name, ref in ref_tensors.items():
        entry = tensors.get(name)
        if entry is None and name == TIED_OUTPUT and tied:
            entry = tensors.get(embedding) if embedding else None
        if entry is None:
            hint = (" (the base's output embedding is not tied to its input embedding, and this fine-tune "
                    "has neither its own nor a config saying it ties them)"
                    if name == TIED_OUTPUT and not ref_tied else "")
            raise TaskvecError(f"{checkpoint.path}: tensor '{name}' is missing (present in {ref.path}){hint}")
        _check_shape(name, entry, ref)
        sources[name].append(entry)
    return [name for name in tensors if name not in ref_tensors and not (name == TIED_OUTPUT and tied)]


def _same_bytes(a: TensorEntry, b: TensorEntry, step: int = 1 << 24) -> bool:
    """Whether two stored tensors hold the same bytes (a tied pair saved twice), read in steps."""
    if (a.dtype, a.shape, a.nbytes) != (b.dtype, b.shape, b.nbytes):
        return False
    if (a.path, a.offset) == (b.path, b.offset):
        return True
    reader = FileReader()
    try:
        for start in range(0, a.nbytes, step):
            size = min(step, a.nbytes - start)
            first, second = bytearray(size), bytearray(size)
            reader.read_into(a.path, a.offset + start, memoryview(first))
            reader.read_into(b.path, b.offset + start, memoryview(second))
            if first != second:
                return False
        return True
    finally:
        reader.close()


def _match_adapter(reference, ref_tensors, ref_tied, checkpoint, tensors, sources, transposed) -> list[str]:
    """A LoRA adapter as a fine-tune: base + delta for its target modules, its own tensors where it
    trains them whole, the base's everywhere else. Returns a note if it names another base."""
    embedding = next((n for n in INPUT_EMBEDDINGS if n in ref_tensors), None)
    tensors = _adapter_ties(reference, ref_tied, checkpoint, tensors, embedding)
    for name in tensors:
        if name not in ref_tensors:
            raise TaskvecError(f"{checkpoint.path}: the adapter changes '{name}', which {reference.path} "
                               "does not have (an adapter of another model?)")
    for name, ref in ref_tensors.items():
        key = embedding if name == TIED_OUTPUT and ref_tied and name not in tensors and embedding else name
        item = tensors.get(key)
        if isinstance(item, LoraDelta):
            if item.base is not None:  # the module's weight as the adapter saved it: PEFT merges onto that
                _check_shape(key, item.base, ref_tensors[key])
            source = LoraSource(item.base or ref_tensors[key], _oriented(item, ref_tensors[key], transposed))
        elif item is not None:
            _check_shape(name, item, ref)
            source = item
        else:
            source = ref  # untouched by the adapter: the fine-tune holds the base's value
        sources[name].append(source)
    wanted = checkpoint.adapter.base_model
    if wanted and not _names_model(str(wanted), reference):
        return [f"{checkpoint.label}: adapter trained on {wanted}, merged onto {reference.label}"]
    return []


def _names_model(wanted: str, reference) -> bool:
    """Whether an adapter's base_model_name_or_path names the reference: its label, its folder's
    name, or a local path to the same folder (a symlink to it, say)."""
    if reference.label in (wanted, Path(wanted).name):
        return True
    try:
        return Path(wanted).expanduser().resolve() == Path(reference.path).resolve()
    except (OSError, RuntimeError):  # a path that cannot be resolved names no local model
        return False


def _adapter_ties(reference, ref_tied, checkpoint, tensors, embedding) -> dict:
    """The adapter's tensors on a tied base. A trained embedding saved twice, as embedding and head
    with the same values, is a tied pair (PEFT's ensure_weight_tying): one embedding, the head
    follows it. Refused, what would untie the base's embeddings: PEFT trains a copy of a
    `modules_to_save` embedding (the head keeps the old one) and merges a tied head's LoRA into
    both tensors."""
    if not ref_tied:
        return tensors
    head, own = tensors.get(TIED_OUTPUT), tensors.get(embedding)
    if isinstance(head, TensorEntry) and isinstance(own, TensorEntry) and _same_bytes(head, own):
        return {name: item for name, item in tensors.items() if name != TIED_OUTPUT}
    if TIED_OUTPUT in tensors:
        raise TaskvecError(f"{checkpoint.path}: the adapter changes '{TIED_OUTPUT}', which {reference.path} "
                           "ties to its input embedding; taskvec does not merge that (merge it with PEFT's "
                           "merge_and_unload and pass the merged model)")
    if embedding in tensors and not isinstance(tensors[embedding], LoraDelta):
        raise TaskvecError(f"{checkpoint.path}: the adapter trains '{embedding}' whole (modules_to_save), which "
                           f"{reference.path} ties to its output embedding: the fine-tune's head is the old "
                           "embedding, which a tied output cannot hold; untie the base first")
    return tensors


def _oriented(delta: LoraDelta, ref, transposed: frozenset[str] | None) -> LoraDelta:
    """The delta with the transposition its module type needs: from the architecture's module
    types where known, else from the shapes, else (a square module) from the adapter's flag."""
    if delta.embedding:
        return delta
    if transposed is not None:
        return replace(delta, transpose=delta.target.removesuffix(".weight") in transposed)
    rows, cols = delta.b.shape[0], delta.a.shape[1]
    if rows != cols:
        return replace(delta, transpose=tuple(ref.shape) == (cols, rows))
    return delta


def _check_shape(name: str, entry, ref) -> None:
    if entry.shape == ref.shape:
        return
    vocabulary = (name == TIED_OUTPUT or name in INPUT_EMBEDDINGS) and entry.shape[1:] == ref.shape[1:]
    if vocabulary:
        raise TaskvecError(
            f"{entry.path}: tensor '{name}' has {entry.shape[0]} rows (vocabulary), but {ref.path} has "
            f"{ref.shape[0]}: the vocabulary was resized; merge against a base resized the same way "
            "(model.resize_token_embeddings, then save_pretrained)"
        )
    raise TaskvecError(f"{entry.path}: tensor '{name}' has shape {list(entry.shape)}, "
                       f"but {ref.path} has {list(ref.shape)}")


def _extras_note(extras: dict[str, list[str]], strict: bool, notes: list[str]) -> None:
    for label, names in extras.items():
        if strict:
            raise TaskvecError(f"{label}: holds {len(names)} tensors the base does not have "
                               f"({_listing(names)}); without --strict they are left out")
        notes.append(f"{label}: {len(names)} tensors the base does not have left out ({_listing(names)})")


def _listing(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
