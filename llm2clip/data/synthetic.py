"""Deterministic synthetic image-caption data in img2dataset/WebDataset layout.

Each image is a 3x3 grid scene of 1-3 flat shapes on a plain background. Every caption is generated
from the same structured scene, so every caption is true of its image, and each image carries two
short and two dense captions worded by different templates: stage 1 trains on "any two captions of
one image", which needs paraphrases rather than identical strings (the CPU prototype showed that
training on (short, dense) pairs alone taught the encoder to ignore position, size and background).

Determinism: every sample draws from its own RNG seeded by (seed, split, index), so a split of n
samples is a prefix of a split of m > n samples, and the same arguments give byte-identical files
(fixed JPEG settings, tar headers with mtime 0, fixed member order, sorted tokenizer vocabulary).
Every file is written to ``name.tmp`` and renamed, so readers never see a half-written file.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import shutil
import string
import tarfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

# Sorted, so the index of a shape here equals torchvision-ImageFolder's class index.
SHAPES = ("circle", "cross", "diamond", "square", "star", "triangle")
COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 30), "yellow": (240, 220, 40), "green": (40, 170, 60),
    "cyan": (40, 200, 210), "blue": (40, 80, 220), "purple": (130, 50, 170), "pink": (245, 130, 200),
}
# Background colours are disjoint from object colours so a colour word names one role only.
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128),
               "brown": (110, 70, 40)}
SIZES = {"small": 0.28, "large": 0.44}  # circumradius as a fraction of a grid cell (< 0.5: no overlap)
# (row, col) of the 3x3 grid -> position name, and two ways of saying where an object is.
POSITIONS = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
_POS_AT = {"top left": "in the top left", "top": "at the top", "top right": "in the top right",
           "left": "on the left", "center": "in the center", "right": "on the right",
           "bottom left": "in the bottom left", "bottom": "at the bottom",
           "bottom right": "in the bottom right"}
_POS_NOUN = {"top left": "the top left corner", "top": "the top edge", "top right": "the top right corner",
             "left": "the left side", "center": "the middle", "right": "the right side",
             "bottom left": "the bottom left corner", "bottom": "the bottom edge",
             "bottom right": "the bottom right corner"}
_COUNT = {1: "one", 2: "two", 3: "three"}

INSTRUCTIONS = (
    "Given a caption, retrieve a similar relevant caption",
    "Given a sentence, retrieve a detailed relevant sentence",
    "Given a detailed sentence, retrieve a short relevant sentence",
)
# Common embedding-model task instructions (E5/LLM2Vec style), only so their words are in the vocabulary.
_OTHER_INSTRUCTIONS = (
    "Retrieve semantically similar text",
    "Given a web search query, retrieve relevant passages that answer the query",
    "Given a question, retrieve Wikipedia passages that answer the question",
    "Given a claim, find documents that refute the claim",
    "Given a premise, retrieve a hypothesis that is entailed by the premise",
    "Retrieve duplicate questions from a forum",
    "Represent the query for retrieving evidence documents",
    "Identify the topic or theme of the given news articles",
    "Classify the sentiment of a given movie review",
    "Given an image caption, retrieve the image",
)
CLASSIFICATION_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "a drawing of a {}.",
                            "an image of a {}.", "a {} shape.", "a {} on a plain background.")
COLOR_TEMPLATES = ("a {} shape.", "a picture of a {} shape.", "a drawing of a {} shape.",
                   "an image of a {} object.", "a {} shape on a plain background.")
JPEG_QUALITY = 95

SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>")  # ids 0..3, in this order

# Ordinary English so that instructions, prompts and chat-template words tokenise without <unk>.
_ENGLISH = """
a an the this that these those it its they them their there here he she his her we us our you your
i me my is are was were be been being am do does did done doing have has had having will would can
could shall should may might must not no yes and or but if then else so because as of in on at to
from by with without for about into onto over under above below between among through during before
after up down out off again further once only own same than too very just also both each few more
most other some such any all every either neither one two three four five six seven eight nine ten
first second third last next new old good bad big small large little long short high low left right
top bottom middle center centre side edge corner front back inside outside near far around across
along behind beside against toward towards within upon via per what which who whom whose when where
why how whether while until since although though unless given retrieve retrieval relevant similar
similarity detailed detail details caption captions sentence sentences text texts query queries
passage passages document documents answer answers question questions represent representation
semantic semantically meaning search web find match matching describe describes description
descriptions image images photo photos picture pictures drawing drawings painting illustration
scene shape shapes object objects thing things item items instruction instructions instruct task
tasks summary summarize paraphrase paraphrases translate translation title titles article articles
user assistant system human bot model response respond reply message messages conversation chat
start end begin header id eot im inst sys bos eos pad unk mask sep cls token tokens role content
please thank thanks hello hi okay ok sure help show tell give make take get go come see look know
think say use using used want need like love try call ask work feel become leave put mean keep let
seem turn hold bring write read learn change follow stop create speak allow add grow open walk win
offer remember consider appear buy wait serve die send expect build stay fall cut reach kill remain
suggest raise pass sell require report decide pull contain contains containing include includes
including show shows showing shown draw drawn placed located sitting lying standing floating
color colors colour colours colored coloured background backgrounds foreground backdrop plain
simple single multiple several many much lot lots total number count sum pair pairs group set
red orange yellow green cyan blue purple pink white black gray grey brown violet magenta gold silver
dark light bright pale round square circle circles triangle triangles star stars cross crosses
diamond diamonds rectangle oval line lines dot dots point points box boxes ring
person people man woman men women child children boy girl dog dogs cat cats bird horse car cars
bus train plane boat bike bicycle street road city house building room table chair bed window door
tree trees grass flower flowers water sky sun cloud mountain beach sea river field park food plate
cup glass bottle phone computer book paper wall floor kitchen bathroom sign player ball game team
time year years day days week month today tomorrow yesterday morning night way world life hand
part place case point government company system program question work home water
world country state school family student group problem fact
word words name names list example examples type types kind form forms class classes category
label labels value values data dataset information result results score scores test train
true false correct wrong right wrong best better worse worst great important different available
possible able sure clear full whole free real main general specific common certain various
another something anything nothing everything someone anyone everyone somebody nobody
really quite rather almost already still even ever never always often sometimes usually
how much many more less least well about around nearly exactly
retrieves retrieved retrieving finds found finding gives giving represents represented representing
describing described matches matched identify identifies identified classify classifies classified
evidence claim claims refute refutes support supports supported premise hypothesis hypotheses
entailed entail entails contradict contradicts duplicate duplicates forum post posts tweet tweets
review reviews movie movies product products news topic topics theme themes sentiment emotion
scientific paper papers abstract abstracts cited cite wikipedia encyclopedia financial medical
legal code programming language languages english chinese french german spanish translated
summaries summarized reason reasons reasoning explain explains explanation argument arguments
counter statement statements fact facts opinion opinions dialogue dialogues utterance utterances
riding rides ride walking walks running runs sitting sits standing stands eating eats holding holds
playing plays looking looks wearing wears carrying carries flying flies swimming jumping
smiling talking driving drives parked parking cooking reading writing watching working
horses birds trees cups plates bottles tables chairs windows doors buildings streets roads cities
houses mountains clouds rivers fields parks beaches boats planes trains buses bikes phones books
shirt hat jacket dress shoes bag umbrella kite surfboard skateboard pizza cake sandwich banana apple
orange fruit vegetables grassy sandy snowy snow rain sunny cloudy indoor outdoor indoors outdoors
close closer closest small smaller smallest large larger largest big bigger biggest tall short
young older colorful colourful striped wooden metal plastic glass empty crowded busy quiet
above below beneath underneath next nearby beside between middle centered positioned located
"""


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _plural(word: str, n: int) -> str:
    if n == 1:
        return word
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


# ---------------------------------------------------------------- scenes and pixels

def sample_scene(rng: random.Random, image_size: int, n_objects: int | None = None,
                 shape: str | None = None, color: str | None = None) -> dict:
    """Draw a random scene: 1-3 objects in distinct cells of a 3x3 grid, listed in reading order.

    Each object records shape, color, size, position, grid row/col, pixel centre (x, y), circumradius
    in pixels and the RGB it is painted with.
    """
    n = n_objects if n_objects is not None else rng.randint(1, 3)
    cells = sorted(rng.sample(sorted(POSITIONS), n))
    cell = image_size / 3.0
    objects = []
    for row, col in cells:
        color = rng.choice(list(COLORS)) if color is None else color
        size = rng.choice(list(SIZES))
        objects.append({
            "shape": shape if shape is not None else rng.choice(SHAPES), "color": color, "size": size,
            "position": POSITIONS[(row, col)], "row": row, "col": col,
            "center": [round((col + 0.5) * cell, 3), round((row + 0.5) * cell, 3)],
            "radius": round(SIZES[size] * cell, 3), "rgb": list(COLORS[color]),
        })
    background = rng.choice(list(BACKGROUNDS))
    return {"objects": objects, "background": background, "background_rgb": list(BACKGROUNDS[background]),
            "width": image_size, "height": image_size}


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rad = r if k % 2 == 0 else 0.45 * r
        ang = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def render_scene(scene: dict) -> Image.Image:
    """Paint a scene as an RGB PIL image (no anti-aliasing, so object colours are exact pre-JPEG)."""
    img = Image.new("RGB", (scene["width"], scene["height"]), tuple(scene["background_rgb"]))
    draw = ImageDraw.Draw(img)
    for o in scene["objects"]:
        (cx, cy), r, fill = o["center"], o["radius"], tuple(o["rgb"])
        if o["shape"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o["shape"] == "square":
            h = 0.85 * r
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o["shape"] == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif o["shape"] == "triangle":  # apex up, centroid on the cell centre
            draw.polygon([(cx, cy - r), (cx + 0.866 * r, cy + 0.5 * r), (cx - 0.866 * r, cy + 0.5 * r)],
                         fill=fill)
        elif o["shape"] == "star":
            draw.polygon(_star(cx, cy, r), fill=fill)
        elif o["shape"] == "cross":
            t = max(1.5, 0.3 * r)
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
        else:
            raise ValueError(f"unknown shape {o['shape']!r}; known: {SHAPES}")
    return img


def encode_jpeg(img: Image.Image, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 keeps small objects' colours intact; fixed settings keep the bytes reproducible.
    img.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()


# ---------------------------------------------------------------- captions

def _np(o: dict, size: bool = True) -> str:
    words = ([o["size"]] if size else []) + [o["color"], o["shape"]]
    return f"{_article(words[0])} {' '.join(words)}"


def _short_list(objs):
    return _join([_np(o, size=False) for o in objs])


SHORT_TEMPLATES = (
    lambda objs, bg: _short_list(objs),
    lambda objs, bg: f"a picture of {_short_list(objs)}",
    lambda objs, bg: f"{_short_list(objs)} on a {bg} background",
    lambda objs, bg: f"an image with {_short_list(objs)}",
    lambda objs, bg: f"{_COUNT[len(objs)]} {_plural('shape', len(objs))}: {_short_list(objs)}",
    lambda objs, bg: f"a drawing of {_short_list(objs)}",
)


def _there_are(n: int, noun: str) -> str:
    return f"there {'is' if n == 1 else 'are'} {_COUNT[n]} {_plural(noun, n)}"


DENSE_TEMPLATES = (
    lambda objs, bg: _cap(f"{_there_are(len(objs), 'shape')} on a {bg} background: "
                          + _join([f"{_np(o)} {_POS_AT[o['position']]}" for o in objs]) + "."),
    lambda objs, bg: f"A {bg} background with {_COUNT[len(objs)]} {_plural('object', len(objs))}. "
                     + " ".join(_cap(f"{_np(o)} is {_POS_AT[o['position']]}.") for o in objs),
    lambda objs, bg: f"This image shows {_COUNT[len(objs)]} {_plural('shape', len(objs))} against a {bg} "
                     "background. " + " ".join(_cap(f"{_POS_AT[o['position']]} there is {_np(o)}.")
                                               for o in objs),
    lambda objs, bg: " ".join(_cap(f"{_POS_NOUN[o['position']]} holds {_np(o)}.") for o in objs)
                     + f" The background is {bg}, and {_there_are(len(objs), 'object')} in total.",
    lambda objs, bg: _cap(f"{_COUNT[len(objs)]} {_plural('object', len(objs))} drawn on {bg}: ")
                     + "; ".join(f"{_article(o['shape'])} {o['shape']} that is {o['size']} and {o['color']}, "
                                 f"placed {_POS_AT[o['position']]}" for o in objs) + ".",
    lambda objs, bg: f"A picture with a {bg} backdrop and {_COUNT[len(objs)]} "
                     f"{_plural('shape', len(objs))}, namely "
                     + _join([f"{_np(o)} ({o['position']})" for o in objs]) + ".",
)


def _other_order(objs: list, rng: random.Random) -> list:
    if len(objs) == 1:
        return list(objs)
    order = list(objs)
    while order == objs:
        rng.shuffle(order)
    return order


def make_captions(scene: dict, rng: random.Random) -> dict:
    """Four true captions of a scene; the two short and the two dense ones use different templates.

    ``caption``/``dense`` list objects in reading order, ``short_alt``/``dense_alt`` in another order
    (for 2-3 objects) and with another template, so no two of the four strings are equal.
    """
    objs, bg = scene["objects"], scene["background"]
    s1, s2 = rng.sample(range(len(SHORT_TEMPLATES)), 2)
    d1, d2 = rng.sample(range(len(DENSE_TEMPLATES)), 2)
    alt = _other_order(objs, rng)
    return {"caption": SHORT_TEMPLATES[s1](objs, bg), "short_alt": SHORT_TEMPLATES[s2](alt, bg),
            "dense": DENSE_TEMPLATES[d1](objs, bg), "dense_alt": DENSE_TEMPLATES[d2](alt, bg)}


def sample_key(split: str, index: int) -> str:
    return f"{split}_{index:09d}"  # no dots: WebDataset splits the extension at the first dot


def make_sample(split: str, index: int, seed: int, image_size: int,
                jpeg_quality: int = JPEG_QUALITY) -> tuple[str, bytes, dict]:
    """(key, jpeg bytes, json metadata) of one sample; a pure function of its arguments."""
    rng = random.Random(f"llm2clip-synthetic:{seed}:{split}:{index}")
    scene = sample_scene(rng, image_size)
    caps = make_captions(scene, rng)
    key = sample_key(split, index)
    meta = {"key": key, **caps, "objects": scene["objects"], "background": scene["background"],
            "background_rgb": scene["background_rgb"], "count": len(scene["objects"]),
            "width": image_size, "height": image_size}
    return key, encode_jpeg(render_scene(scene), jpeg_quality), meta


# ---------------------------------------------------------------- tokenizer

def _pre_tokenizer():
    from tokenizers import pre_tokenizers
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated"),
                                    pre_tokenizers.Digits(individual_digits=True)])


def _normalizer():
    from tokenizers import normalizers
    return normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])


def caption_vocabulary_texts() -> list[str]:
    """Every text whose words the tokenizer must know: all templates at every object count and every
    lexical choice, instructions, classification prompts, chat words and an English word list."""
    texts = [_ENGLISH, " ".join(INSTRUCTIONS + _OTHER_INSTRUCTIONS), " ".join(CLASSIFICATION_TEMPLATES + COLOR_TEMPLATES),
             " ".join(COLORS) + " " + " ".join(BACKGROUNDS) + " " + " ".join(SIZES),
             " ".join(SHAPES) + " " + " ".join(_plural(s, 2) for s in SHAPES),
             " ".join(_POS_AT.values()) + " " + " ".join(_POS_NOUN.values()) + " " + " ".join(_COUNT.values()),
             "<|begin_of_text|><|start_header_id|>system<|end_header_id|> <|eot_id|> [INST] [/INST] "
             "<|im_start|>user <|im_end|> <|endoftext|> " + string.ascii_lowercase + " " + string.digits
             + " " + " ".join(string.punctuation)]
    rng = random.Random("llm2clip-synthetic:vocabulary")
    for n in (1, 2, 3):
        for shape in SHAPES:
            scene = sample_scene(rng, 64, n_objects=n, shape=shape)
            texts += [t(scene["objects"], scene["background"]) for t in SHORT_TEMPLATES + DENSE_TEMPLATES]
    return texts


def build_tokenizer(model_max_length: int = 512):
    """A Llama-like WordLevel ``PreTrainedTokenizerFast``: lowercase, punctuation split, ``<s>`` prepended.

    The vocabulary is sorted after the four special tokens (ids 0-3: <unk>, <pad>, <s>, </s>), so it
    does not depend on how many samples were generated and the saved files are reproducible.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    norm, pre = _normalizer(), _pre_tokenizer()
    words = set()
    for text in caption_vocabulary_texts():
        words.update(w for w, _ in pre.pre_tokenize_str(norm.normalize_str(text)))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words - set(SPECIAL_TOKENS)):
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = norm, pre
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ."
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>", model_max_length=model_max_length)


def write_tokenizer(dst: str | os.PathLike, tokenizer=None) -> Path:
    """Save ``tokenizer`` (default :func:`build_tokenizer`) with ``save_pretrained`` into ``dst``.

    The folder is written under ``dst.tmp`` and then renamed over ``dst``.
    """
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tokenizer if tokenizer is not None else build_tokenizer()).save_pretrained(str(tmp))
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)
    return dst


# ---------------------------------------------------------------- writing

def _atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
    os.replace(tmp, path)


def _dumps(obj) -> str:
    return json.dumps(obj, indent=None, ensure_ascii=False)


def _remove_stale(directory: Path, pattern: str, keep: set[str]) -> None:
    """Remove files this generator wrote on an earlier, larger run (so globs don't pick them up)."""
    if directory.is_dir():
        for p in directory.iterdir():
            if p.is_file() and re.fullmatch(pattern, p.name) and p.name not in keep:
                p.unlink()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed header fields (what webdataset.TarWriter writes with mtime=0): reproducible bytes. Plain
    # tarfile rather than TarWriter because importing webdataset imports torch (~2 s).
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    tar.addfile(info, io.BytesIO(data))


def _write_split(out: Path, split: str, n: int, seed: int, image_size: int, shard_size: int,
                 jpeg_quality: int, keep_val: list | None) -> dict:
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    sizes, written = {}, set()
    for shard, start in enumerate(range(0, n, shard_size)):
        name = f"shard-{shard:06d}"
        tar_path = split_dir / f"{name}.tar"
        tmp = tar_path.with_name(tar_path.name + ".tmp")
        count = 0
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in range(start, min(n, start + shard_size)):
                key, jpg, meta = make_sample(split, index, seed, image_size, jpeg_quality)
                _add_member(tar, f"{key}.jpg", jpg)
                _add_member(tar, f"{key}.txt", meta["caption"].encode("utf-8"))
                _add_member(tar, f"{key}.json", _dumps(meta).encode("utf-8"))
                if keep_val is not None:
                    keep_val.append((key, jpg, meta))
                count += 1
        os.replace(tmp, tar_path)
        _atomic_write(split_dir / f"{name}_stats.json", _dumps({"count": count, "successes": count}))
        sizes[tar_path.name] = count
        written.update({tar_path.name, f"{name}_stats.json"})
    _remove_stale(split_dir, r"shard-\d{6}(\.tar|_stats\.json)", written)
    _atomic_write(split_dir / "sizes.json", json.dumps(sizes, indent=2))
    return {"samples": n, "shards": len(sizes)}


def _karpathy_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _write_retrieval(out: Path, val: list) -> dict:
    root = out / "eval" / "retrieval"
    images, long_lines = [], []
    for imgid, (key, jpg, meta) in enumerate(val):
        _atomic_write(root / "images" / f"{key}.jpg", jpg)
        raws = [meta["caption"], meta["short_alt"], meta["dense"], meta["dense_alt"]]
        sentids = list(range(4 * imgid, 4 * imgid + 4))
        images.append({"filepath": "images", "filename": f"{key}.jpg", "split": "test", "imgid": imgid, "sentids": sentids,
                       "sentences": [{"raw": r, "tokens": _karpathy_tokens(r), "imgid": imgid, "sentid": s}
                                     for r, s in zip(raws, sentids)]})
        long_lines.append(_dumps({"image": f"images/{key}.jpg", "caption": meta["dense"]}))
    _remove_stale(root / "images", r"val_\d{9}\.jpg", {f"{k}.jpg" for k, _, _ in val})
    _atomic_write(root / "karpathy.json", _dumps({"images": images, "dataset": "synthetic"}))
    _atomic_write(root / "long.jsonl", "".join(line + "\n" for line in long_lines))
    return {"images": len(images), "captions": 4 * len(images), "long_pairs": len(long_lines)}


def _write_classification(out: Path, per_class: int, seed: int, image_size: int, jpeg_quality: int,
                          attr: str = "shape") -> dict:
    """Single-object images, one folder per class; the class is the object's shape or its colour."""
    root = out / "eval" / "classification"
    classes = sorted(SHAPES) if attr == "shape" else sorted(COLORS)
    for stale in (p for p in root.iterdir() if p.is_dir() and p.name not in classes) if root.is_dir() else ():
        shutil.rmtree(stale)
    for cls in classes:
        names = set()
        for n in range(per_class):
            rng = random.Random(f"llm2clip-synthetic:{seed}:cls:{cls}:{n}")
            scene = sample_scene(rng, image_size, n_objects=1, **{attr: cls})
            names.add(f"{n:05d}.jpg")
            _atomic_write(root / cls / f"{n:05d}.jpg", encode_jpeg(render_scene(scene), jpeg_quality))
        _remove_stale(root / cls, r"\d{5}\.jpg", names)
    templates = CLASSIFICATION_TEMPLATES if attr == "shape" else COLOR_TEMPLATES
    _atomic_write(root / "classnames.txt", "".join(c + "\n" for c in classes))
    # clip_benchmark's file name and {c} placeholder, so readers pick the set's own templates up
    _atomic_write(root / "zeroshot_classification_templates.txt", "".join(t.replace("{}", "{c}") + "\n" for t in templates))
    return {"classes": len(classes), "attribute": attr, "per_class": per_class, "images": len(classes) * per_class}


def _readme(summary: dict, args: dict) -> str:
    return f"""Synthetic LLM2CLIP data, generated by llm2clip.data.synthetic.generate({args})
Re-running with the same arguments reproduces every file byte for byte.

train/shard-NNNNNN.tar   {summary['train']['samples']} samples in {summary['train']['shards']} shards
val/shard-NNNNNN.tar     {summary['val']['samples']} samples in {summary['val']['shards']} shards
  each sample: KEY.jpg ({args['image_size']}x{args['image_size']} RGB), KEY.txt (short caption),
  KEY.json {{key, caption, short_alt, dense, dense_alt, objects[], background, background_rgb, count,
  width, height}}; KEY = <split>_<index:09d>. Per shard NAME_stats.json; per split sizes.json.
eval/retrieval/          val images as images/KEY.jpg; karpathy.json (4 captions per image: caption,
                         short_alt, dense, dense_alt; split "test"); long.jsonl (image, dense caption) 1:1
eval/classification/     ImageFolder layout CLASS/NNNNN.jpg, one object per image, class = its {summary["classification"]["attribute"]};
                         classnames.txt (class-index order = sorted folder names),
                         zeroshot_classification_templates.txt ({{c}} placeholder)
tokenizer/               WordLevel PreTrainedTokenizerFast ({summary['tokenizer']['vocab_size']} tokens;
                         <unk>=0 <pad>=1 <s>=2 </s>=3; <s> prepended like Llama)

Scenes: 1-3 objects on a 3x3 grid (positions {', '.join(POSITIONS.values())});
shapes {', '.join(SHAPES)}; colours {', '.join(COLORS)}; sizes {', '.join(SIZES)};
backgrounds {', '.join(BACKGROUNDS)}. Captions say left/right: do not flip images horizontally.
{len(SHORT_TEMPLATES)} short and {len(DENSE_TEMPLATES)} dense caption templates.
"""


def generate(out_dir: str | os.PathLike, n_train: int = 2000, n_val: int = 500, seed: int = 0,
             image_size: int = 64, shard_size: int = 500, cls_per_class: int = 20,
             jpeg_quality: int = JPEG_QUALITY, cls_attr: str = "shape") -> dict:
    """Write the whole synthetic dataset under ``out_dir`` and return a summary of counts.

    ``seconds`` in the summary is wall time; nothing time-dependent is written to disk.
    """
    if shard_size < 1 or n_train < 0 or n_val < 0 or cls_per_class < 0:
        raise ValueError("shard_size must be >= 1 and counts >= 0")
    if image_size < 24:
        raise ValueError(f"image_size={image_size} is too small to draw a 3x3 grid of shapes (min 24)")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"out_dir": str(out), "seed": seed, "image_size": image_size}
    summary["train"] = _write_split(out, "train", n_train, seed, image_size, shard_size, jpeg_quality, None)
    val: list = []
    summary["val"] = _write_split(out, "val", n_val, seed, image_size, shard_size, jpeg_quality, val)
    summary["retrieval"] = _write_retrieval(out, val)
    if cls_attr not in ("shape", "color"):
        raise ValueError(f"cls_attr must be 'shape' or 'color', not {cls_attr!r}")
    summary["classification"] = _write_classification(out, cls_per_class, seed, image_size, jpeg_quality, cls_attr)
    summary["images_seconds"] = round(time.perf_counter() - t0, 3)
    tokenizer = build_tokenizer()
    summary["tokenizer"] = {"path": str(write_tokenizer(out / "tokenizer", tokenizer)),
                            "vocab_size": len(tokenizer)}
    args = {"n_train": n_train, "n_val": n_val, "seed": seed, "image_size": image_size,
            "shard_size": shard_size, "cls_per_class": cls_per_class, "jpeg_quality": jpeg_quality,
            "cls_attr": cls_attr}
    _atomic_write(out / "README.txt", _readme(summary, args))
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
