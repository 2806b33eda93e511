"""Built-in vocabularies: sizes, MaskCLIP/TCL naming, the background rule's stuff names, and parse_vocab."""

from fmbseg.vocab import parse_vocab
from fmbseg.vocab_builtin import BUILTIN_VOCABULARIES, COCO_STUFF171, COCO_STUFF_91


def test_sizes_and_order():
    sizes = {k: len(v) for k, v in BUILTIN_VOCABULARIES.items()}
    print("built-in vocabulary sizes:", sizes)
    assert sizes == {"voc20": 20, "voc21": 21, "context59": 59, "coco_object": 81, "coco_stuff171": 171,
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
