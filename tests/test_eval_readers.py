"""Dataset readers on tiny fixtures written here, image loading, and the HF CLIP wrapper."""

import base64
import io
import json
import os
import tarfile

import pytest
import torch
from PIL import Image

from llm2clip.eval import ImageTextModel
from llm2clip.eval.readers import (
    READERS,
    AnnotationError,
    ClassificationSet,
    CorruptImageError,
    ImageLoader,
    MissingImagesError,
    RetrievalSet,
    _iter_json_array,
    check_missing,
    load_image,
    read_dataset,
)
from llm2clip.eval.templates import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    fill_template,
    load_templates,
)

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def img(path, i=0, fmt=None, size=(12, 9)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, COLORS[i % len(COLORS)]).save(path, format=fmt)
    return str(path)


def img_bytes(i=0, fmt="PNG"):
    buf = io.BytesIO()
    extra = {"lossless": True} if fmt == "WEBP" else {}  # clip_benchmark writes lossless webp
    Image.new("RGB", (10, 10), COLORS[i % len(COLORS)]).save(buf, format=fmt, **extra)
    return buf.getvalue()


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def jsonl(path, rows):
    return write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def add_tar_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# ----------------------------------------------------------------------------- templates


def test_templates_openai80_and_imagenet_names():
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 == len(set(OPENAI_IMAGENET_TEMPLATES))
    assert OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert OPENAI_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."
    assert len(IMAGENET_CLASSNAMES) == 1000
    assert IMAGENET_CLASSNAMES[0] == "tench" and IMAGENET_CLASSNAMES[999] == "toilet paper"
    assert load_templates("openai80") == OPENAI_IMAGENET_TEMPLATES
    assert load_templates("simple") == ["a photo of a {}."]
    assert fill_template("a photo of a {c}.", "dog") == "a photo of a dog."


def test_load_templates_files(tmp_path):
    txt = write(tmp_path / "t.txt", "# comment\na {c} photo.\n\nart of the {}.\n")
    assert load_templates(txt) == ["a {} photo.", "art of the {}."]
    js = write(tmp_path / "t.json", json.dumps({"imagenet1k": ["itap of a {c}."], "cars": ["a {c} car."]}))
    assert load_templates(js, key="cars") == ["a {} car."]
    with pytest.raises(ValueError, match="key="):
        load_templates(js)
    bad = write(tmp_path / "bad.txt", "ok {}\nno placeholder\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        load_templates(bad)
    with pytest.raises(ValueError, match="openai80"):
        load_templates("openai81")


# ----------------------------------------------------------------------------- classification


def test_imagefolder_sorted_classes_and_classnames(tmp_path):
    root = tmp_path / "val"
    for c, cls in enumerate(["dog", "cat", "bird"]):
        for j in range(2):
            img(root / cls / f"{j}.jpg", c)
    ds = read_dataset("imagefolder", str(root))
    assert isinstance(ds, ClassificationSet)
    assert ds.classnames == ["bird", "cat", "dog"]
    assert [lab for _, lab in ds.samples] == [0, 0, 1, 1, 2, 2]
    assert ds.templates == OPENAI_IMAGENET_TEMPLATES and ds.missing == []
    # plain classnames.txt (label order), then a tab mapping, and a templates file with {c}
    write(root / "classnames.txt", "small bird\ntabby cat\ngolden retriever\n")
    write(root / "zeroshot_classification_templates.txt", "a photo of a {c}.\n")
    ds = read_dataset("imagefolder", str(root))
    assert ds.classnames == ["small bird", "tabby cat", "golden retriever"]
    assert ds.templates == ["a photo of a {}."]
    write(root / "classnames.txt", "dog\tgood dog\nbird\tsongbird\ncat\tkitty\n")
    assert read_dataset("imagefolder", str(root)).classnames == ["songbird", "kitty", "good dog"]
    write(root / "classnames.txt", "only one\n")
    with pytest.raises(AnnotationError, match="3 classes"):
        read_dataset("imagefolder", str(root))


def test_imagefolder_imagenet_wnids_get_openai_names(tmp_path):
    root = tmp_path / "imagenet_val"
    wnids = [f"n{i:08d}" for i in range(1000)]
    for w in wnids:
        os.makedirs(root / w)
    img(root / wnids[0] / "a.JPEG", 0, fmt="JPEG")
    img(root / wnids[999] / "b.JPEG", 1, fmt="JPEG")
    ds = read_dataset("imagefolder", str(root))
    assert ds.classnames == IMAGENET_CLASSNAMES
    assert [lab for _, lab in ds.samples] == [0, 999]


def test_imagefolder_labels_file_missing_images_and_threshold(tmp_path):
    root = tmp_path / "flat"
    for i in range(4):
        img(root / f"ILSVRC2012_val_{i:08d}.JPEG", i, fmt="JPEG")
    lines = [f"ILSVRC2012_val_{i:08d}.JPEG {i % 2}" for i in range(6)]  # images 4, 5 absent
    write(root / "labels.txt", "\n".join(lines) + "\n")
    write(root / "classnames.txt", "zero\none\n")
    ds = read_dataset("imagefolder", str(root))  # labels.txt is picked up automatically
    assert len(ds.samples) == 4 and len(ds.missing) == 2
    assert ds.classnames == ["zero", "one"]
    assert check_missing(ds, 0.5) == pytest.approx(2 / 6)
    with pytest.raises(MissingImagesError, match=r"2 of 6 images are missing \(33.33%.*ILSVRC2012_val_00000004"):
        check_missing(ds)
    write(root / "labels.txt", "ILSVRC2012_val_00000000.JPEG 0\nbroken_line_without_label\n")
    with pytest.raises(AnnotationError, match=r"labels.txt:2"):
        read_dataset("imagefolder", str(root))


def _clip_benchmark_wds(root, n=5, n_per_shard=3, ext="webp"):
    """Mimic clip_benchmark's convert_dataset: <root>/test/{i}.tar + nshards.txt, metadata in root."""
    os.makedirs(root / "test")
    shards = 0
    for start in range(0, n, n_per_shard):
        with tarfile.open(root / "test" / f"{shards}.tar", "w") as tar:
            for i in range(start, min(start + n_per_shard, n)):
                add_tar_member(tar, f"s{i:07d}.{ext}", img_bytes(i, fmt="WEBP" if ext == "webp" else "PNG"))
                add_tar_member(tar, f"s{i:07d}.cls", str(i % 3).encode())
        shards += 1
    write(root / "test" / "nshards.txt", f"{shards}\n")
    write(root / "classnames.txt", "apple\nbanana\ncherry\n")
    write(root / "zeroshot_classification_templates.txt", "a photo of a {c}.\na blurry photo of a {c}.\n")
    return root


def test_wds_classification_clip_benchmark_layout(tmp_path):
    root = _clip_benchmark_wds(tmp_path / "wds_cifar")
    ds = read_dataset("wds_classification", str(root))
    assert ds.classnames == ["apple", "banana", "cherry"]
    assert ds.templates == ["a photo of a {}.", "a blurry photo of a {}."]
    assert [lab for _, lab in ds.samples] == [0, 1, 2, 0, 1]
    ref = ds.samples[3][0]
    assert ref == (str(root / "test" / "1.tar"), "s0000003.webp")
    loader = ImageLoader()
    assert loader(ref).getpixel((0, 0)) == COLORS[3]
    assert load_image(ds.samples[0][0]).mode == "RGB"
    # also readable when pointed at the split folder
    assert len(read_dataset("wds_classification", str(root / "test")).samples) == 5


def test_wds_classification_bad_input(tmp_path):
    root = _clip_benchmark_wds(tmp_path / "wds", n=2)
    with tarfile.open(root / "test" / "0.tar", "a") as tar:
        add_tar_member(tar, "s0000009.webp", img_bytes())
        add_tar_member(tar, "s0000009.cls", b"not-a-number")
    with pytest.raises(AnnotationError, match=r"0.tar::s0000009.cls"):
        read_dataset("wds_classification", str(root))
    write(root / "test" / "nshards.txt", "3\n")
    with pytest.raises(FileNotFoundError, match="2 of 3 shards"):
        read_dataset("wds_classification", str(root))


def test_wds_retrieval(tmp_path):
    root = tmp_path / "wds_flickr"
    os.makedirs(root / "test")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for i in range(3):
            add_tar_member(tar, f"s{i:07d}.jpg", img_bytes(i, fmt="JPEG"))
            add_tar_member(tar, f"s{i:07d}.txt", f"caption {i} a\ncaption {i} b\n".encode())
    write(root / "test" / "nshards.txt", "1")
    write(root / "dataset_type.txt", "retrieval")
    ds = read_dataset("wds_retrieval", str(root))
    assert len(ds.image_paths) == 3 and ds.captions[:2] == ["caption 0 a", "caption 0 b"]
    assert ds.txt_to_img == [0, 0, 1, 1, 2, 2]
    with pytest.raises(AnnotationError, match="wds_retrieval"):
        read_dataset("wds_classification", str(root))


# ----------------------------------------------------------------------------- retrieval


def test_karpathy_flickr_and_coco(tmp_path):
    root = tmp_path / "flickr30k-images"
    images = []
    for i in range(4):
        img(root / f"{1000 + i}.jpg", i)
        images.append({"filename": f"{1000 + i}.jpg", "split": "test" if i < 3 else "train",
                       "sentences": [{"raw": f" cap {i}.{j} ", "tokens": []} for j in range(5)]})
    images.append({"filename": "gone.jpg", "split": "test", "sentences": [{"raw": "x"}]})
    ann = write(tmp_path / "dataset_flickr30k.json", json.dumps({"images": images, "dataset": "flickr30k"}))
    ds = read_dataset("karpathy", ann, images_root=str(root))
    assert isinstance(ds, RetrievalSet) and ds.name == "flickr30k_test"
    assert len(ds.image_paths) == 3 and len(ds.captions) == 15 and ds.captions[0] == "cap 0.0"
    assert ds.txt_to_img == [i for i in range(3) for _ in range(5)]
    assert ds.missing == [str(root / "gone.jpg")]
    assert len(read_dataset("karpathy", ann, images_root=str(root), max_captions_per_image=2).captions) == 6
    # COCO: filepath sub-folder, default images_root = the JSON's folder
    img(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000001.jpg")
    coco = [{"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "split": "test",
             "sentences": [{"raw": f"c{j}"} for j in range(6)]}]
    ann2 = write(tmp_path / "coco" / "dataset_coco.json", json.dumps({"images": coco, "dataset": "coco"}))
    ds2 = read_dataset("karpathy", ann2)
    assert ds2.image_paths == [str(tmp_path / "coco" / "val2014" / "COCO_val2014_000000000001.jpg")]
    assert len(ds2.captions) == 6  # every caption kept
    with pytest.raises(AnnotationError, match="splits present"):
        read_dataset("karpathy", ann2, split="val")


def test_karpathy_malformed(tmp_path):
    bad = write(tmp_path / "a.json", json.dumps({"images": [{"filename": "x.jpg", "split": "test"}]}))
    with pytest.raises(AnnotationError, match=r"images\[0\]: missing field 'sentences'"):
        read_dataset("karpathy", bad)
    broken = write(tmp_path / "b.json", '{"images": [\n{"filename": "x.jpg",\n "split": }\n]}')
    with pytest.raises(AnnotationError, match=r"b.json:3"):
        read_dataset("karpathy", broken)


def test_sharegpt4v_first_1000_protocol(tmp_path):
    entries = []
    for i in range(5):
        img(tmp_path / "coco" / "train2017" / f"{i}.jpg", i)
        entries.append({"id": str(i), "image": f"coco/train2017/{i}.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image?"},
            {"from": "gpt", "value": f"Line one {i}.\nLine two."}]})
    ann = write(tmp_path / "share-captioner_coco_lcs_sam_1246k_1107.json", json.dumps(entries, indent=1))
    ds = read_dataset("sharegpt4v", ann, limit=3)
    assert len(ds.image_paths) == 3 and ds.captions[1] == "Line one 1. Line two."
    assert ds.txt_to_img == [0, 1, 2]
    with pytest.raises(AnnotationError, match="only 5 entries"):
        read_dataset("sharegpt4v", ann)  # default limit is 1000


def test_json_array_streaming_with_tiny_chunks(tmp_path):
    rows = [{"a": i, "s": "x" * (i * 3)} for i in range(20)]
    p = write(tmp_path / "arr.json", "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n")
    got = list(_iter_json_array(p, chunk_chars=7))
    assert [o for _, _, o in got] == rows
    assert [ln for _, ln, _ in got][:3] == [2, 3, 4]
    bad = write(tmp_path / "bad.json", '[\n{"a": 1},\n{"a": 2,, }\n]')
    with pytest.raises(AnnotationError, match=r"bad.json:3: invalid JSON in element \[1\]"):
        list(_iter_json_array(bad, chunk_chars=5))


def test_urban1k(tmp_path):
    for i in (1, 2, 10):
        write(tmp_path / "Urban1k" / "caption" / f"{i}.txt", f"A long caption {i}.\nsecond line ignored\n")
        if i != 2:
            img(tmp_path / "Urban1k" / "image" / f"{i}.jpg", i)
    ds = read_dataset("urban1k", str(tmp_path / "Urban1k"))
    assert ds.captions == ["A long caption 1.", "A long caption 10."]
    assert len(ds.missing) == 1 and ds.missing[0].endswith(os.path.join("image", "2.jpg"))
    with pytest.raises(MissingImagesError, match="1 of 3"):
        check_missing(ds, 0.2)


def test_docci(tmp_path):
    rows = [{"example_id": f"test_{i}", "split": "test" if i < 3 else "train", "image_file": f"test_{i:05d}.jpg",
             "description": f"A detailed description {i}."} for i in range(5)]
    for r in rows:
        img(tmp_path / "docci" / "images" / r["image_file"])
    jsonl(tmp_path / "docci" / "docci_descriptions.jsonlines", rows)
    ds = read_dataset("docci", str(tmp_path / "docci"))
    assert ds.name == "docci_test" and len(ds.image_paths) == 3 and ds.txt_to_img == [0, 1, 2]
    write(tmp_path / "docci" / "docci_descriptions.jsonlines", json.dumps(rows[0]) + "\n{not json}\n")
    with pytest.raises(AnnotationError, match=r"docci_descriptions.jsonlines:2: invalid JSON"):
        read_dataset("docci", str(tmp_path / "docci"))


def test_xm3600_language_filter(tmp_path):
    rows = []
    for i in range(3):
        key = f"{i:016x}"
        img(tmp_path / "xm3600" / "images" / f"{key}.jpg", i)
        rows.append({"image/key": key, "en": {"caption": [f"en {i} a", f"en {i} b"], "caption/tokenized": []},
                     "de": {"caption": [f"de {i}"]}})
    jsonl(tmp_path / "xm3600" / "captions.jsonl", rows)
    ds = read_dataset("xm3600", str(tmp_path / "xm3600"))
    assert ds.name == "xm3600_en" and len(ds.captions) == 6 and ds.txt_to_img == [0, 0, 1, 1, 2, 2]
    assert read_dataset("xm3600", str(tmp_path / "xm3600"), captions="first").captions == ["en 0 a", "en 1 a", "en 2 a"]
    assert read_dataset("xm3600", str(tmp_path / "xm3600"), lang="de").captions == ["de 0", "de 1", "de 2"]
    with pytest.raises(AnnotationError, match=r"captions.jsonl:1: no captions for language 'fr'.*'de', 'en'"):
        read_dataset("xm3600", str(tmp_path / "xm3600"), lang="fr")


def test_flickr_cn_clip_benchmark_and_chinese_clip_layouts(tmp_path):
    root = tmp_path / "flickr30k"
    for i in range(2):
        img(root / f"{100 + i}.jpg", i)
    write(root / "flickr30k_test_zh.txt", "image,caption\n100.jpg,一只狗,在草地上\n100.jpg,狗\n101.jpg,一只猫\n")
    ds = read_dataset("flickr_cn", str(root))
    assert ds.captions == ["一只狗,在草地上", "狗", "一只猫"] and ds.txt_to_img == [0, 0, 1]
    # Chinese-CLIP: base64 images in a tsv, texts in jsonl
    cc = tmp_path / "Flickr30k-CN"
    write(cc / "test_imgs.tsv", "".join(f"{1000 + i}\t{base64.b64encode(img_bytes(i)).decode()}\n" for i in range(2)))
    jsonl(cc / "test_texts.jsonl", [{"text_id": 1, "text": "红色", "image_ids": [1000]},
                                    {"text_id": 2, "text": "绿色", "image_ids": [1001]},
                                    {"text_id": 3, "text": "蓝色", "image_ids": [1001]},
                                    {"text_id": 4, "text": "不存在", "image_ids": [4242]}])
    ds = read_dataset("flickr_cn", str(cc))
    assert ds.image_paths == [(str(cc / "test_imgs.tsv"), "1000"), (str(cc / "test_imgs.tsv"), "1001")]
    assert ds.txt_to_img == [0, 1, 1] and len(ds.missing) == 1
    loader = ImageLoader()
    assert loader(ds.image_paths[1]).getpixel((0, 0)) == COLORS[1]
    assert loader(ds.image_paths[0]).getpixel((0, 0)) == COLORS[0]


def test_coco_cn_original_layout(tmp_path):
    root = tmp_path / "coco-cn-version1805v1.1"
    ids = ["COCO_val2014_000000000139", "COCO_train2014_000000000009"]
    write(root / "coco-cn_test.txt", "\n".join(ids) + "\n")
    write(root / "imageid.human-written-caption.txt",
          f"{ids[0]}#0\t客厅里有电视\n{ids[1]}#0\t一盘食物\n{ids[1]}#1\t午餐\nCOCO_val2014_000000999999#0\t不在测试集\n")
    img(tmp_path / "coco" / "val2014" / f"{ids[0]}.jpg")
    img(tmp_path / "coco" / "train2014" / f"{ids[1]}.jpg")
    ds = read_dataset("coco_cn", str(root), images_root=str(tmp_path / "coco"))
    assert ds.captions == ["客厅里有电视", "一盘食物", "午餐"] and ds.txt_to_img == [0, 1, 1]
    assert ds.missing == []
    write(root / "imageid.human-written-caption.txt", f"{ids[0]} no tab here\n")
    with pytest.raises(AnnotationError, match=r"imageid.human-written-caption.txt:1"):
        read_dataset("coco_cn", str(root))


def test_generic_jsonl_and_csv(tmp_path):
    for i in range(3):
        img(tmp_path / "imgs" / f"{i}.png", i)
    p = jsonl(tmp_path / "ann.jsonl", [{"image": "imgs/0.png", "caption": "zero"},
                                       {"image": "imgs/1.png", "captions": ["one", "uno"]},
                                       {"image": "imgs/0.png", "caption": "null"},
                                       {"image": "imgs/9.png", "caption": "missing"}])
    ds = read_dataset("jsonl", p)
    assert ds.captions == ["zero", "null", "one", "uno"] and ds.txt_to_img == [0, 0, 1, 1]
    assert ds.missing == [str(tmp_path / "imgs" / "9.png")]
    write(tmp_path / "bad.jsonl", json.dumps({"image": "imgs/0.png", "caption": "ok"}) + "\n\n" +
          json.dumps({"image": "imgs/1.png"}) + "\n")
    with pytest.raises(AnnotationError, match=r"bad.jsonl:3: missing field"):
        read_dataset("jsonl", str(tmp_path / "bad.jsonl"))
    c = write(tmp_path / "ann.csv", 'image,captions\nimgs/2.png,"[""two"", ""dos""]"\nimgs/1.png,"[""one""]"\n')
    ds = read_dataset("csv", c)
    assert ds.captions == ["two", "dos", "one"] and ds.txt_to_img == [0, 0, 1]
    c2 = write(tmp_path / "bad.csv", "image,caption\nimgs/0.png,fine\nimgs/1.png,\n")
    with pytest.raises(AnnotationError, match=r"bad.csv:3"):
        read_dataset("csv", c2)


def test_read_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="valid kinds: .*karpathy.*xm3600"):
        read_dataset("flickr", str(tmp_path))
    with pytest.raises(ValueError, match=r"no option\(s\) \['langauge'\]"):
        read_dataset("xm3600", str(tmp_path), langauge="de")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_dataset("jsonl", str(tmp_path / "nowhere.jsonl"))
    assert {"imagefolder", "wds_classification", "karpathy", "sharegpt4v", "urban1k", "docci", "xm3600",
            "flickr_cn", "coco_cn", "jsonl", "csv"} <= set(READERS)


def test_corrupt_images_are_named(tmp_path):
    bad = write(tmp_path / "imgs" / "broken.jpg", "this is not a jpeg")
    with pytest.raises(CorruptImageError, match="broken.jpg"):
        load_image(bad)
    good = img_bytes(0, fmt="JPEG")
    trunc = tmp_path / "imgs" / "truncated.jpg"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptImageError, match="truncated.jpg"):
        load_image(str(trunc))
    with pytest.raises(FileNotFoundError, match="absent.jpg"):
        load_image(str(tmp_path / "absent.jpg"))
    shard = tmp_path / "0.tar"
    with tarfile.open(shard, "w") as tar:
        add_tar_member(tar, "s0000001.jpg", b"\xff\xd8garbage")
    with pytest.raises(CorruptImageError, match=r"0.tar::s0000001.jpg"):
        load_image((str(shard), "s0000001.jpg"))
    with pytest.raises(FileNotFoundError, match="s0000002.jpg"):
        load_image((str(shard), "s0000002.jpg"))


# ----------------------------------------------------------------------------- HF CLIP wrapper


def _tiny_clip_folder(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast

    words = "a photo of the red green blue dog cat square circle".split()
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "<s>", "</s>"] + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                     eos_token="</s>", model_max_length=16)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=24)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    hf_tok.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def test_hf_clip_wrapper_end_to_end(tmp_path):
    from llm2clip.eval.hf_clip import HFCLIPModel
    from llm2clip.eval.metrics import retrieval_metrics

    with pytest.raises(FileNotFoundError, match="no_such_model"):
        HFCLIPModel.from_pretrained(str(tmp_path / "no_such_model"))
    folder = _tiny_clip_folder(tmp_path / "tiny_clip")
    model = HFCLIPModel.from_pretrained(folder)
    assert isinstance(model, ImageTextModel) and model.name == "tiny_clip"

    for i in range(3):
        img(tmp_path / "data" / f"{i}.png", i, size=(48, 40))
    ann = jsonl(tmp_path / "data" / "ann.jsonl", [{"image": f"{i}.png", "captions": [f"a {c} square", f"the {c}"]}
                                                  for i, c in enumerate(["red", "green", "blue"])])
    ds = read_dataset("jsonl", ann)
    loader = ImageLoader()
    pixels = torch.stack([model.preprocess(loader(r)) for r in ds.image_paths])
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    # preprocessing equals OpenAI CLIP's eval transform on PIL images: shortest side to 32 (long side
    # floored), bicubic, centre crop with rounded offsets, /255, normalise
    for w, h in [(48, 40), (33, 70), (32, 32)]:
        im = Image.frombytes("RGB", (w, h), bytes((7 * i) % 256 for i in range(w * h * 3)))
        nw, nh = (32, int(32 * h / w)) if w <= h else (int(32 * w / h), 32)
        left, top = int(round((nw - 32) / 2.0)), int(round((nh - 32) / 2.0))
        ref = im.resize((nw, nh), Image.BICUBIC).crop((left, top, left + 32, top + 32))
        ref = torch.tensor(list(ref.getdata()), dtype=torch.float32).t().reshape(3, 32, 32) / 255
        mean = torch.tensor(model.processor.image_mean)[:, None, None]
        std = torch.tensor(model.processor.image_std)[:, None, None]
        assert torch.allclose(model.preprocess(im), (ref - mean) / std, atol=1e-5)
    img_f = model.encode_image(pixels)
    txt_f = model.encode_text(ds.captions + ["a " + "photo " * 40])  # over-long text is truncated
    assert img_f.shape == (3, 24) and txt_f.shape == (7, 24)
    # the wrapper's features are the model's own projected embeddings
    ref = model.model(input_ids=model.tokenizer(ds.captions[:1], return_tensors="pt")["input_ids"],
                      pixel_values=pixels[:1])
    assert torch.allclose(torch.nn.functional.normalize(txt_f[:1], dim=-1), ref.text_embeds, atol=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(img_f[:1], dim=-1), ref.image_embeds, atol=1e-5)
    txt_f = txt_f[:6]
    sim = torch.nn.functional.normalize(img_f, dim=-1) @ torch.nn.functional.normalize(txt_f, dim=-1).t()
    m = retrieval_metrics(sim, torch.tensor(ds.txt_to_img), ks=(1, 5))
    assert set(m) == {"i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5"}
    assert m["i2t_R@5"] == 100.0 and m["t2i_R@5"] == 100.0  # 3 images / 6 texts: k >= gallery
