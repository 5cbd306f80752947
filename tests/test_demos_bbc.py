"""BBC News as the demo reads it: class names from the data's topic folders, a seeded split."""

from __future__ import annotations

from hf_tbn.demos.bbc import bbc_news, split


def test_topics_are_named_and_numbered_in_sorted_order() -> None:
    data = bbc_news()
    names = data.features["label"].names
    assert names == sorted(names) and len(names) == 5 and len(data) == 2225
    texts = [[t.lower() for t, y in zip(data["text"], data["label"], strict=True) if y == i] for i in range(5)]
    assert min(len(t) for t in texts) > 300
    # Each topic's articles are about that topic: a word of the topic appears in them most often.
    words = {"business": "profit", "entertainment": "film", "politics": "labour", "sports": "match", "tech": "software"}
    for name, word in words.items():
        share = [sum(word in t for t in topic) / len(topic) for topic in texts]
        assert max(range(5), key=share.__getitem__) == names.index(name), (name, share)


def test_split_is_seeded_and_disjoint() -> None:
    train, test = split(100, 0.2, seed=0)
    assert len(test) == 20 and sorted(train + test) == list(range(100))
    assert split(100, 0.2, seed=0) == (train, test) and split(100, 0.2, seed=1) != (train, test)
