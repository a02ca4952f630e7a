"""grounding.captions.clean_caption: what a shard stores as the caption."""
from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grounding.captions import clean_caption


@pytest.mark.parametrize("raw, clean", [
    # issue 16's hostile caption: escaped markup, an entity, control characters
    ("&lt;b&gt;Red&lt;/b&gt; square &amp; blue circle \x00\x07", "Red square & blue circle"),
    ("&lt;b&gt;Red&lt;/b&gt; square &amp; blue circle \\0\\a", "Red square & blue circle"),  # spelled-out escapes
    ("<b>Red</b> car on a <i>country</i> road", "Red car on a country road"),
    ("Red car<br>on a road<br/>", "Red car on a road"),
    ("<p>A dog</p><p>A cat</p>", "A dog A cat"),
    ('<a href="https://x.io/a?b=1&amp;c=2">Blue</a> mug', "Blue mug"),
    ("A dog <!-- tracking pixel --> on a mat", "A dog on a mat"),
    ("Women&#39;s red dress", "Women's red dress"),
    ("Caf&eacute; table &#x26; chairs", "Café table & chairs"),
    ("Salt &amp;amp; pepper", "Salt & pepper"),                     # double-escaped
    ("&amp;lt;i&amp;gt;Tall&amp;lt;/i&amp;gt; vase", "Tall vase"),  # double-escaped markup
    ("AT&T store &nothing here", "AT&T store &nothing here"),       # not entities: kept as written
    ("5 < 7 > 3 and <3 love", "5 < 7 > 3 and <3 love"),             # not tags
    ("A  dog \u200b on \t a\u00a0mat\r\n", "A dog on a mat"),
    ("zero\u200bwidth and soft\u00adhyphen", "zero width and softhyphen"),
    ("Line one\\nLine two", "Line one Line two"),
    ("Cafe\u0301 au lait", "Café au lait"),                        # decomposed accent -> NFC
    ("Cute puppy 🐶❤️ with a bow #dogs", "Cute puppy 🐶❤️ with a bow #dogs"),  # emoji and hashtags stay
    ("   ", ""),
    ("", ""),
])
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_clean_caption_rejects_non_text():
    with pytest.raises(TypeError):
        clean_caption(None)
    with pytest.raises(TypeError):
        clean_caption(b"bytes")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120) | st.lists(st.sampled_from(
    ["a", "dog", "&amp;", "&lt;b&gt;", "</b>", "<i>", "&#39;", "\x00", "\u200b", "  ", "\t", "e\u0301", "&",
     "<", ">", "\\n", "😀"]), max_size=16).map("".join))
def test_clean_caption_output_is_clean_and_stable(raw):
    out = clean_caption(raw)
    assert out == out.strip() and "  " not in out
    assert not any(unicodedata.category(c) == "Cc" for c in out)
    assert unicodedata.is_normalized("NFC", out)
    assert clean_caption(out) == out      # idempotent: what build_record checks (caption_not_clean)


def test_escaped_many_times_over_still_cleans_to_a_fixed_point():
    raw = "&amp;amp;amp;amp;lt;b&amp;amp;amp;amp;gt;red ball&amp;amp;amp;amp; a box"
    assert clean_caption(raw) == "red ball& a box"
    assert clean_caption(clean_caption(raw)) == clean_caption(raw)
