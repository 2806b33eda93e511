"""Built-in vocabularies: sizes, MaskCLIP/TCL naming, the background rule's stuff names, and parse_vocab."""

from fmbseg.vocab import parse_vocab
from fmbseg.vocab_builtin import BUILTIN_VOCABULARIES, COCO_STUFF171, COCO_STUFF_91


def test_sizes_and_order():
    sizes = {k: len(v) for k, v in BUILTIN_VOCABULARIES.items()}
    print("built-in vocabulary sizes:", sizes)
    assert sizes == {"voc20": 20, "voc21": 21, "context59": 59, "context60": 60, "coco_object": 81, "coco_stuff171": 171,
                     "cityscapes": 19, "ade150": 150}
    for name, names in BUILTIN_VOCABULARIES.items():
        assert len(set(names)) == len(names), name
        assert all(n == n.strip() and n for n in names), name


def test_tcl_naming():
    voc = BUILTIN_VOCABULARIES["voc21"]
    assert voc[0] == "background" and voc[1] == "aeroplane" and voc[-1] == "tvmonitor"
    assert "diningtable" in voc and "pottedplant" in voc and "motorbike" in voc
    assert BUILTIN_VOCABULARIES["voc20"] == voc[1:]
    obj = BUILTIN_VOCABULARIES["coco_object"]
    assert obj[0] == "background" and obj[1:] == list(COCO_STUFF171[:80]) and obj[-1] == "toothbrush"
    assert BUILTIN_VOCABULARIES["cityscapes"][:3] == ["road", "sidewalk", "building"]
    assert BUILTIN_VOCABULARIES["ade150"][7] == "bed" and BUILTIN_VOCABULARIES["ade150"][-1] == "flag"
    assert BUILTIN_VOCABULARIES["context59"][0] == "aeroplane" and BUILTIN_VOCABULARIES["context59"][-1] == "wood"


def test_stuff_names_for_the_background_rule():
    assert len(COCO_STUFF_91) == 91
    assert COCO_STUFF_91[0] == "banner" and COCO_STUFF_91[-1] == "wood" and "sky-other" in COCO_STUFF_91
    assert not set(COCO_STUFF_91) & set(BUILTIN_VOCABULARIES["coco_object"])
    assert not set(COCO_STUFF_91) & set(BUILTIN_VOCABULARIES["voc21"])


def test_parse_builtin():
    v = parse_vocab("voc21")
    assert len(v) == 21 and v.names[0] == "background"


# -- parsing hostile or mistaken specs (issue 13 item 13) --------------------------------------------------------
import json  # noqa: E402

import pytest  # noqa: E402

from fmbseg.vocab import Vocabulary, VocabularyError  # noqa: E402


@pytest.mark.parametrize("spec", ["myvocab.yaml", "nonexistent_vocab", "vocabs/mine.txt", "~/v.txt", "./v"])
def test_path_like_spec_that_does_not_exist_is_an_error_not_one_class(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VocabularyError) as e:
        parse_vocab(spec)
    msg = str(e.value)
    assert spec in msg and "did you mean" in msg and "voc21" in msg and "ade150" in msg, msg


def test_directory_and_near_miss_builtin_names(tmp_path):
    (tmp_path / "vocab").mkdir()
    with pytest.raises(VocabularyError, match="is a directory") as e:
        parse_vocab(str(tmp_path / "vocab"))
    assert "did you mean" in str(e.value)
    for typo, meant in (("vocc21", "voc21"), ("ade", "ade150"), ("cityscape", "cityscapes"), ("coco", "coco_object")):
        with pytest.raises(VocabularyError, match=f"did you mean '{meant}'"):
            parse_vocab(typo)
    # Plain words are still one-class vocabularies; a trailing comma forces a name that looks like a file.
    assert parse_vocab("red").names == ("red",) and parse_vocab("traffic_light,").names == ("traffic_light",)
    assert parse_vocab(" cat , dog ,").names == ("cat", "dog")


def test_duplicates_are_refused_case_insensitively(tmp_path):
    for spec in ("Red,red", "red,green,RED"):
        with pytest.raises(VocabularyError, match="duplicate class names .*case-insensitive.*'[Rr][Ee][Dd]' and"):
            parse_vocab(spec)
    (tmp_path / "v.txt").write_text("cat\nCat: kitty\n")
    with pytest.raises(VocabularyError, match=f"duplicate.*in {tmp_path / 'v.txt'}"):
        parse_vocab(str(tmp_path / "v.txt"))
    with pytest.raises(VocabularyError):
        Vocabulary(("a", "A"))


def test_utf8_bom_is_stripped_and_non_utf8_names_the_file(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffcafé: coffee shop\nroad\n".encode("utf-8"))
    v = parse_vocab(str(tmp_path / "bom.txt"))
    assert v.names == ("café", "road") and v.synonyms == (("coffee shop",), ())
    (tmp_path / "latin1.txt").write_bytes("café\nroad\n".encode("latin-1"))
    with pytest.raises(VocabularyError) as e:
        parse_vocab(str(tmp_path / "latin1.txt"))
    msg = str(e.value)
    assert str(tmp_path / "latin1.txt") in msg and "not UTF-8" in msg and "0xe9 at offset 3" in msg, msg
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(VocabularyError, match=f"no class names in {tmp_path / 'empty.txt'}"):
        parse_vocab(str(tmp_path / "empty.txt"))


def test_coco_json_uses_its_categories_in_id_order(tmp_path):
    coco = {"images": [{"id": 1, "file_name": "a.jpg", "height": 4, "width": 4}], "annotations": [],
            "categories": [{"id": 18, "name": "dog", "supercategory": "animal"},
                           {"id": 3, "name": "car", "supercategory": "vehicle"},
                           {"id": 17, "name": "cat", "supercategory": "animal"}]}
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    assert parse_vocab(str(tmp_path / "instances.json")).names == ("car", "cat", "dog")
    (tmp_path / "names.json").write_text('["sky", "sea"]')     # the `vocabulary` schema metadata's form
    assert parse_vocab(str(tmp_path / "names.json")).names == ("sky", "sea")
    (tmp_path / "bad.json").write_text('{"images": []}')
    with pytest.raises(VocabularyError, match="categories"):
        parse_vocab(str(tmp_path / "bad.json"))
    (tmp_path / "broken.json").write_text('{"categories": [')
    with pytest.raises(VocabularyError, match="not valid JSON"):
        parse_vocab(str(tmp_path / "broken.json"))
