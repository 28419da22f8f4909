//! HF-style Jinja chat templates, rendered as transformers' `apply_chat_template(tokenize=False)`
//! renders them: `trim_blocks` and `lstrip_blocks` on, no trailing newline kept, lenient
//! undefined values (like jinja2's default `Undefined`), loop controls, `raise_exception(msg)`,
//! `strftime_now(fmt)`, a `tojson` filter that writes what Python's
//! `json.dumps(x, ensure_ascii=False)` writes, and Python string/dict methods (`.strip()`,
//! `.items()`, …); values print as Python's `str()` prints them (`None`, `True`, `['a', 1]`).
//! `{% generation %}` blocks (transformers' assistant-mask extension) render their body
//! unchanged.

use std::io;

use candle_core::quantized::gguf_file::Content;
use chrono::format::{Item, StrftimeItems};
use chrono::{DateTime, Utc};
use minijinja::value::Kwargs;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};
use serde_json::ser::Formatter;

use super::gguf::{gguf_tokens, meta_str, meta_token_id};
use crate::error::{Error, Result};

const NAME: &str = "chat_template";

/// A compiled chat template plus the BOS/EOS strings it sees as `bos_token` / `eos_token`.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn render_err(e: minijinja::Error) -> Error {
    let mut msg = e.to_string();
    let mut src = std::error::Error::source(&e);
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    Error::ChatTemplate(msg)
}

impl ChatTemplate {
    /// Compile a HF-style Jinja chat template. `bos_token`/`eos_token` are exposed to the
    /// template under those names (undefined when `None`).
    pub fn new(source: &str, bos_token: Option<String>, eos_token: Option<String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
        });
        env.add_function("strftime_now", |fmt: String| strftime(&fmt, &Utc::now()));
        env.add_filter("tojson", tojson);
        env.set_formatter(python_formatter);
        env.add_template_owned(NAME, strip_generation_tags(source)).map_err(render_err)?;
        Ok(ChatTemplate { env, source: source.to_string(), bos_token, eos_token })
    }

    /// Render `messages` (a JSON array of objects with at least string `role` and `content`;
    /// `content` may also be a list, passed through, or null/absent on a message with
    /// `tool_calls`) as transformers' `apply_chat_template(tokenize=False)` does. A malformed
    /// `messages` is `InvalidInput` naming the index; a template failure (including
    /// `raise_exception`) is `ChatTemplate`.
    pub fn render(&self, messages: &serde_json::Value, add_generation_prompt: bool) -> Result<String> {
        validate_messages(messages)?;
        let tmpl = self.env.get_template(NAME).map_err(render_err)?;
        let opt = |t: &Option<String>| t.as_deref().map_or(Value::UNDEFINED, Value::from);
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => opt(&self.bos_token),
            eos_token => opt(&self.eos_token),
        };
        tmpl.render(ctx).map_err(render_err)
    }

    /// The template source as given to [`ChatTemplate::new`].
    pub fn source(&self) -> &str {
        &self.source
    }
}

/// The GGUF's `tokenizer.chat_template`, compiled with the GGUF's BOS/EOS token strings;
/// `None` when the GGUF has no template.
pub fn chat_template_from_gguf(content: &Content) -> Result<Option<ChatTemplate>> {
    let Some(source) = meta_str(content, "tokenizer.chat_template")? else {
        return Ok(None);
    };
    let tokens =
        if content.metadata.contains_key("tokenizer.ggml.tokens") { gguf_tokens(content)? } else { Vec::new() };
    let name = |key: &str| -> Result<Option<String>> {
        if tokens.is_empty() {
            return Ok(None);
        }
        Ok(meta_token_id(content, key, tokens.len())?.map(|id| tokens[id as usize].to_string()))
    };
    let bos = name("tokenizer.ggml.bos_token_id")?;
    let eos = name("tokenizer.ggml.eos_token_id")?;
    ChatTemplate::new(source, bos, eos).map(Some)
}

fn validate_messages(messages: &serde_json::Value) -> Result<()> {
    let list =
        messages.as_array().ok_or_else(|| Error::input("messages must be a JSON array of {role, content} objects"))?;
    if list.is_empty() {
        return Err(Error::input("messages is empty"));
    }
    for (i, m) in list.iter().enumerate() {
        let obj = m.as_object().ok_or_else(|| Error::input(format!("messages[{i}] is not an object")))?;
        if !obj.get("role").is_some_and(|r| r.is_string()) {
            return Err(Error::input(format!("messages[{i}] has no string 'role'")));
        }
        let ok = match obj.get("content") {
            Some(serde_json::Value::String(_)) | Some(serde_json::Value::Array(_)) => true,
            None | Some(serde_json::Value::Null) => obj.contains_key("tool_calls"),
            Some(_) => false,
        };
        if !ok {
            return Err(Error::input(format!("messages[{i}] 'content' must be a string or a list")));
        }
    }
    Ok(())
}

/// Prints values as Python's `str()` does: `None`, `True`/`False`, and lists/dicts in repr
/// form (`['a', 1]`); strings, numbers and the rest as usual.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    use minijinja::value::ValueKind as K;
    let text = match value.kind() {
        K::None | K::Bool | K::Seq | K::Map => py_repr(value),
        _ => return minijinja::escape_formatter(out, state, value),
    };
    std::fmt::Write::write_str(out, &text).map_err(|e| minijinja::Error::new(ErrorKind::WriteFailure, e.to_string()))
}

/// Python's `repr()` of a template value (close enough for JSON-like data).
fn py_repr(value: &Value) -> String {
    use minijinja::value::ValueKind as K;
    let items = |v: &Value| v.try_iter().map(|it| it.collect::<Vec<_>>()).unwrap_or_default();
    match value.kind() {
        K::None | K::Undefined => "None".into(),
        K::Bool => (if value.is_true() { "True" } else { "False" }).into(),
        K::Number if !value.is_integer() => f64::try_from(value.clone()).map_or_else(|_| value.to_string(), py_float),
        K::String => {
            let s = value.as_str().unwrap_or_default();
            let q = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
            let mut r = String::from(q);
            for c in s.chars() {
                match c {
                    '\\' => r.push_str("\\\\"),
                    '\n' => r.push_str("\\n"),
                    '\r' => r.push_str("\\r"),
                    '\t' => r.push_str("\\t"),
                    c if c == q => {
                        r.push('\\');
                        r.push(c);
                    }
                    c if (c as u32) < 0x20 || c as u32 == 0x7f => r.push_str(&format!("\\x{:02x}", c as u32)),
                    c => r.push(c),
                }
            }
            r.push(q);
            r
        }
        K::Seq => format!("[{}]", items(value).iter().map(py_repr).collect::<Vec<_>>().join(", ")),
        K::Map => {
            let entries = items(value)
                .iter()
                .map(|k| format!("{}: {}", py_repr(k), py_repr(&value.get_item(k).unwrap_or_default())))
                .collect::<Vec<_>>();
            format!("{{{}}}", entries.join(", "))
        }
        _ => value.to_string(),
    }
}

/// Replace `{% generation %}` / `{% endgeneration %}` (transformers' AssistantTracker) by
/// `{% if true %}` / `{% endif %}`, keeping the whitespace-control markers.
fn strip_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos + 2..];
        let ctrl = tag.strip_prefix(['-', '+']).map_or("", |_| &tag[..1]);
        let body = tag[ctrl.len()..].trim_start();
        let (word, repl) = if body.starts_with("endgeneration") {
            ("endgeneration", "endif")
        } else if body.starts_with("generation") {
            ("generation", "if true")
        } else {
            ("", "")
        };
        let after = body[word.len()..].trim_start();
        let end_ctrl = after.strip_prefix(['-', '+']).map_or("", |_| &after[..1]);
        if !word.is_empty() && after[end_ctrl.len()..].starts_with("%}") {
            out.push_str(&format!("{{%{ctrl} {repl} {end_ctrl}%}}"));
            rest = &after[end_ctrl.len() + 2..];
        } else {
            out.push_str("{%");
            rest = tag;
        }
    }
    out.push_str(rest);
    out
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, positional `ensure_ascii, indent` or keywords.
fn tojson(
    value: Value,
    ensure_ascii: Option<bool>,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let ascii = ensure_ascii.or(kwargs.get::<Option<bool>>("ensure_ascii")?).unwrap_or(false);
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_string(),
            None => {
                let n = usize::try_from(v.clone()).map_err(|_| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: bad indent {v}"))
                })?;
                " ".repeat(n.min(64))
            }
        }),
        None => None,
    };
    let (item_sep, key_sep) = match kwargs.get::<Option<Vec<String>>>("separators")? {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => return Err(minijinja::Error::new(ErrorKind::InvalidOperation, "tojson: separators must be a pair")),
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let err = |e: &dyn std::fmt::Display| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"));
    let mut json = serde_json::to_value(&value).map_err(|e| err(&e))?;
    if sort_keys {
        json.sort_all_objects();
    }
    let fmt = PyJson { indent, item_sep, key_sep, ascii, level: 0, has_value: false };
    let mut out = Vec::new();
    serde::Serialize::serialize(&json, &mut serde_json::Serializer::with_formatter(&mut out, fmt))
        .map_err(|e| err(&e))?;
    String::from_utf8(out).map_err(|e| err(&e))
}

/// Python's `json.dumps` layout as a serde_json formatter: the given separators and indent,
/// floats as Python's `repr`, and with `ensure_ascii` every character from U+007F on written as
/// `\uXXXX` UTF-16 units.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ascii: bool,
    /// Depth of the array or object being written.
    level: usize,
    /// Whether that array or object has a value yet (an empty one closes on its own line).
    has_value: bool,
}

impl PyJson {
    fn newline<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        if let Some(indent) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.level {
                w.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(bracket)
    }

    fn close<W: ?Sized + io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(bracket)
    }

    fn item<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(self.item_sep.as_bytes())?;
        }
        self.newline(w)
    }
}

impl Formatter for PyJson {
    fn write_f64<W: ?Sized + io::Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        w.write_all(py_float(value).as_bytes())
    }

    fn write_string_fragment<W: ?Sized + io::Write>(&mut self, w: &mut W, fragment: &str) -> io::Result<()> {
        if !self.ascii {
            return w.write_all(fragment.as_bytes());
        }
        for c in fragment.chars() {
            if (c as u32) < 0x7f {
                w.write_all(&[c as u8])?;
            } else {
                for unit in c.encode_utf16(&mut [0u16; 2]) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }

    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.item(w, first)
    }

    fn end_array_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.open(w, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.close(w, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        self.item(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(self.key_sep.as_bytes())
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let sci = format!("{f:e}");
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if f != 0.0 && !(-4..16).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// C/Python `strftime` of `t` (UTC) through chrono, `%-d`-style unpadded forms included.
/// chrono refuses a directive it does not know; glibc (and so Python) copies it through, and so
/// does this.
fn strftime(fmt: &str, t: &DateTime<Utc>) -> String {
    let mut out = String::with_capacity(fmt.len());
    let mut rest = fmt;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        // `%`, an optional `-` (no padding), one character
        let after = &rest[i + 1..];
        let flag = usize::from(after.starts_with('-'));
        let len = 1 + flag + after[flag..].chars().next().map_or(0, char::len_utf8);
        let directive = &rest[i..i + len];
        let items: Vec<Item> = StrftimeItems::new(directive).collect();
        if items.iter().any(|item| matches!(item, Item::Error)) {
            out.push_str(directive);
        } else {
            out.push_str(&t.format_with_items(items.into_iter()).to_string());
        }
        rest = &rest[i + len..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::super::testdata::{gguf_content, reference_file};
    use super::super::{load_hf_dir, Tokenizer};
    use super::*;
    use serde_json::json;

    /// `c0_ids[:c0_prompt_len]` and `c1_ids[:c1_prompt_len]` of smollm2_reference.npz.
    const PROMPT_IDS: [&[u32]; 2] = [
        &[
            1, 9690, 198, 2683, 359, 253, 24459, 2607, 11173, 617, 283, 3572, 260, 2914, 30, 2, 198, 1, 4093, 198,
            2020, 536, 339, 15805, 957, 10582, 47, 2, 198, 1, 520, 9531, 198,
        ],
        &[
            1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
            2, 198, 1, 4093, 198, 2020, 536, 339, 15805, 957, 10582, 47, 2, 198, 1, 520, 9531, 198,
        ],
    ];

    fn reference_conversations() -> Vec<serde_json::Value> {
        let p = reference_file("smollm2_reference.json");
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {p:?}: {e}"));
        let v: serde_json::Value = serde_json::from_str(&text).expect("reference json");
        v["conversations"].as_array().expect("conversations").clone()
    }

    #[test]
    fn gguf_template_matches_transformers_prompts() {
        let content = gguf_content();
        let tmpl = chat_template_from_gguf(&content).unwrap().expect("GGUF has a chat template");
        assert!(tmpl.source().starts_with("{% for message in messages %}"));
        let tok = Tokenizer::from_gguf(&content).unwrap();
        let convs = reference_conversations();
        assert_eq!(convs.len(), 2);
        for (k, conv) in convs.iter().enumerate() {
            let text = tmpl.render(&conv["messages"], true).unwrap();
            assert_eq!(text, conv["prompt_text"].as_str().unwrap(), "conversation {k}");
            assert_eq!(tok.encode(&text, true).unwrap(), PROMPT_IDS[k], "conversation {k}");
            let without = tmpl.render(&conv["messages"], false).unwrap();
            assert_eq!(format!("{without}<|im_start|>assistant\n"), text);
        }
    }

    #[test]
    fn types_are_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<ChatTemplate>();
        check::<Tokenizer>();
    }

    #[test]
    fn bad_messages_are_invalid_input() {
        let t = ChatTemplate::new("{{ messages[0].content }}", None, None).unwrap();
        let cases = [
            (json!({"role": "user", "content": "x"}), "array"),
            (json!([]), "empty"),
            (json!([{"role": "user", "content": "x"}, "hi"]), "messages[1]"),
            (json!([{"role": "user", "content": "x"}, {"content": "x"}]), "messages[1]"),
            (json!([{"role": 3, "content": "x"}]), "messages[0]"),
            (json!([{"role": "user"}]), "messages[0]"),
            (json!([{"role": "user", "content": 5}]), "messages[0]"),
        ];
        for (msgs, needle) in cases {
            let err = t.render(&msgs, false).unwrap_err();
            assert!(matches!(err, Error::InvalidInput(_)) && err.to_string().contains(needle), "{msgs}: {err}");
        }
        let list = json!([{"role": "user", "content": [{"type": "text", "text": "a"}]}]);
        assert_eq!(t.render(&list, false).unwrap(), "[{'type': 'text', 'text': 'a'}]");
        let t = ChatTemplate::new("{{ [none, true, 1, 2.5, \"it's\", 'a\\\\b\\n', {'k': []}] }}", None, None).unwrap();
        assert_eq!(t.render(&list, false).unwrap(), r#"[None, True, 1, 2.5, "it's", 'a\\b\n', {'k': []}]"#);
    }

    #[test]
    fn raise_exception_and_syntax_errors_are_chat_template_errors() {
        let t = ChatTemplate::new(
            "{% if messages[0].role != 'system' %}{{ raise_exception('Roles must alternate!') }}{% endif %}",
            None,
            None,
        )
        .unwrap();
        let err = t.render(&json!([{"role": "user", "content": "x"}]), false).unwrap_err();
        assert!(matches!(err, Error::ChatTemplate(_)) && err.to_string().contains("Roles must alternate!"), "{err}");
        let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
        assert!(matches!(err, Error::ChatTemplate(_)), "{err}");
    }

    /// Expected strings rendered by jinja2 3.1 configured as transformers configures it.
    const T1: &str = r#"{%- set ns = namespace(first_user=none) -%}
{{ bos_token }}
{% for m in messages %}
    {% if m.role == 'system' %}
<<SYS>>{{ m.content | trim }}<</SYS>>
    {% elif m.role == 'user' %}
        {% if ns.first_user is none %}{% set ns.first_user = loop.index0 %}{% endif %}
[USER {{ loop.index }}] {{ m['content'].strip() }}
    {% elif m.role == 'assistant' and m.tool_calls is defined %}
        {% for tc in m.tool_calls %}
<tool_call>{{ tc.function | tojson }}</tool_call>
            {% if loop.index >= 2 %}{% break %}{% endif %}
        {% endfor %}
    {% else %}
{{ m.role | upper }}: {% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}

    {% endif %}
{% endfor %}
first user at {{ ns.first_user }}; {{ messages | length }} messages; eos={{ eos_token }}; unk={{ unk_token }}.
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}
"#;
    const T2: &str = r#"{% set x = {"b": 1, "a": [1.5, "é\n\"q\"", none, true, 100.0, -3], "c": {}} %}
{{ x | tojson }}
{{ x | tojson(indent=2) }}
{{ x | tojson(sort_keys=true) }}
{{ x | tojson(ensure_ascii=true) }}
{{ x | tojson(separators=[",", ":"]) }}
{% for k, v in messages[2].tool_calls[0].function.arguments.items() %}{{ k }}={{ v }};{% endfor %}

{{ "a,b,,c".split(",") | join("|") }} {{ "Hello".startswith("He") }} {{ "  x ".lstrip() }}| {{ "abc".upper() }} {{ "ab" ~ 1 }}
{%- if bos_token is defined %}BOS{% else %} no bos{% endif %}
"#;
    const MESSAGES: &str = r#"[{"role": "system", "content": "  Be terse.  \n"}, {"role": "user", "content": "  Hi there\t"}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 3, "units": null, "ratio": 0.25}}}, {"function": {"name": "b", "arguments": {}}}, {"function": {"name": "never", "arguments": {}}}]}, {"role": "tool", "content": [{"type": "text", "text": "sunny"}, {"type": "text", "text": " 21°C"}]}, {"role": "user", "content": "thanks"}]"#;

    #[test]
    fn renders_like_jinja2_with_transformers_settings() {
        let msgs: serde_json::Value = serde_json::from_str(MESSAGES).unwrap();
        let t1 = ChatTemplate::new(T1, Some("<s>".into()), Some("</s>".into())).unwrap();
        assert_eq!(
            t1.render(&msgs, true).unwrap(),
            "<s>\n<<SYS>>Be terse.<</SYS>>\n[USER 2] Hi there\n<tool_call>{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"days\": 3, \"units\": null, \"ratio\": 0.25}}</tool_call>\n<tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>\nTOOL: sunny 21°C\n[USER 5] thanks\nfirst user at 1; 5 messages; eos=</s>; unk=.\n[ASSISTANT]\n"
        );
        let t2 = ChatTemplate::new(T2, None, None).unwrap();
        assert_eq!(
            t2.render(&msgs, false).unwrap(),
            "{\"b\": 1, \"a\": [1.5, \"é\\n\\\"q\\\"\", null, true, 100.0, -3], \"c\": {}}\n{\n  \"b\": 1,\n  \"a\": [\n    1.5,\n    \"é\\n\\\"q\\\"\",\n    null,\n    true,\n    100.0,\n    -3\n  ],\n  \"c\": {}\n}\n{\"a\": [1.5, \"é\\n\\\"q\\\"\", null, true, 100.0, -3], \"b\": 1, \"c\": {}}\n{\"b\": 1, \"a\": [1.5, \"\\u00e9\\n\\\"q\\\"\", null, true, 100.0, -3], \"c\": {}}\n{\"b\":1,\"a\":[1.5,\"é\\n\\\"q\\\"\",null,true,100.0,-3],\"c\":{}}\ncity=Zürich;days=3;units=None;ratio=0.25;\na|b||c True x | ABC ab1 no bos"
        );
    }

    #[test]
    fn tojson_nests_like_python() {
        // json.dumps({"e": [], "o": {}, "n": [[1], {"k": "😀é"}]}, indent=1, ensure_ascii=True)
        let t = ChatTemplate::new(
            r#"{{ {"e": [], "o": {}, "n": [[1], {"k": "😀é"}]} | tojson(indent=1, ensure_ascii=true) }}"#,
            None,
            None,
        )
        .unwrap();
        assert_eq!(
            t.render(&json!([{"role": "user", "content": ""}]), false).unwrap(),
            "{\n \"e\": [],\n \"o\": {},\n \"n\": [\n  [\n   1\n  ],\n  {\n   \"k\": \"\\ud83d\\ude00\\u00e9\"\n  }\n ]\n}"
        );
    }

    #[test]
    fn generation_tags_strftime_and_floats() {
        let src = "{% for m in messages %}{%- generation -%} {{ m.content }} {%- endgeneration %}{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert_eq!(t.render(&json!([{"role": "user", "content": "hi"}]), false).unwrap(), "hi");
        assert_eq!(strip_generation_tags("{% if a %}{%+ endgeneration -%}"), "{% if a %}{%+ endif -%}");
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = DateTime::from_timestamp(1_709_211_909, 0).unwrap();
        assert_eq!(
            strftime("%d %b %Y|%-d %B|%A %a %H:%M:%S %I%p %j %y %F %T %% %Q", &t),
            "29 Feb 2024|29 February|Thursday Thu 13:05:09 01PM 060 24 2024-02-29 13:05:09 % %Q"
        );
        assert_eq!(strftime("%e|%-e|%w %Z %z %D %R|%-|100%", &t), "29|29|4 UTC +0000 02/29/24 13:05|%-|100%");
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).unwrap();
        let year: i64 = t.render(&json!([{"role": "user", "content": ""}]), false).unwrap().parse().unwrap();
        assert!(year >= 2024);
        for (f, s) in [
            (0.25, "0.25"),
            (100.0, "100.0"),
            (1e-5, "1e-05"),
            (1.5e20, "1.5e+20"),
            (-0.0, "-0.0"),
            (1e16, "1e+16"),
            (0.0001, "0.0001"),
        ] {
            assert_eq!(py_float(f), s);
        }
    }

    /// A temporary HF directory holding the oracle tokenizer.json and the given config files.
    fn hf_dir(name: &str, files: &[(&str, String)]) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("personacore-tok-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(reference_file("smollm2_tokenizer.json"), dir.join("tokenizer.json")).unwrap();
        for (f, text) in files {
            std::fs::write(dir.join(f), text).unwrap();
        }
        dir
    }

    #[test]
    fn load_hf_dir_reads_tokenizer_config_and_templates() {
        let gguf_src = chat_template_from_gguf(&gguf_content()).unwrap().unwrap().source().to_string();
        let cfg = json!({"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>", "lstrip": false},
                         "chat_template": gguf_src});
        let dir = hf_dir(
            "plain",
            &[
                ("tokenizer_config.json", cfg.to_string()),
                ("generation_config.json", json!({"eos_token_id": [2, 0]}).to_string()),
            ],
        );
        let (tok, tmpl) = load_hf_dir(&dir).unwrap();
        let tmpl = tmpl.expect("template");
        assert_eq!(tok.bos_token(), Some(("<|im_start|>".to_string(), 1)));
        assert_eq!(tok.eos_token_ids(), &[2, 0]);
        assert_eq!(tok.vocab_size(), 49152);
        for (k, conv) in reference_conversations().iter().enumerate() {
            let text = tmpl.render(&conv["messages"], true).unwrap();
            assert_eq!(text, conv["prompt_text"].as_str().unwrap());
            assert_eq!(tok.encode(&text, true).unwrap(), PROMPT_IDS[k]);
        }
        let _ = std::fs::remove_dir_all(&dir);

        // A list of named templates -> "default"; chat_template.jinja wins over the config.
        let cfg = json!({"eos_token": "<|im_end|>", "chat_template": [
            {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "{{ eos_token }}dflt"}]});
        let dir = hf_dir("list", &[("tokenizer_config.json", cfg.to_string())]);
        let one = json!([{"role": "user", "content": "x"}]);
        let (tok, tmpl) = load_hf_dir(&dir).unwrap();
        assert_eq!(tmpl.unwrap().render(&one, false).unwrap(), "<|im_end|>dflt");
        assert_eq!((tok.bos_token(), tok.eos_token_ids()), (None, &[2][..]));
        std::fs::write(dir.join("chat_template.jinja"), "jinja {{ messages[0].content }}\n").unwrap();
        let (_, tmpl) = load_hf_dir(&dir).unwrap();
        assert_eq!(tmpl.unwrap().render(&one, false).unwrap(), "jinja x");
        let _ = std::fs::remove_dir_all(&dir);

        // Only tokenizer.json: no template, no special tokens.
        let dir = hf_dir("bare", &[]);
        let (tok, tmpl) = load_hf_dir(&dir).unwrap();
        assert!(tmpl.is_none() && tok.bos_token().is_none() && tok.eos_token_ids().is_empty());
        let _ = std::fs::remove_dir_all(&dir);

        // Errors: missing dir / tokenizer.json, unknown special token, malformed JSON.
        assert!(matches!(load_hf_dir(&dir), Err(Error::NotFound(_))));
        let dir = hf_dir("bad", &[("tokenizer_config.json", json!({"eos_token": "<nope>"}).to_string())]);
        assert!(matches!(load_hf_dir(&dir), Err(Error::Tokenizer(m)) if m.contains("<nope>")));
        std::fs::write(dir.join("tokenizer_config.json"), "{not json").unwrap();
        assert!(matches!(load_hf_dir(&dir), Err(Error::Tokenizer(_))));
        std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
        assert!(matches!(load_hf_dir(&dir), Err(Error::NotFound(p)) if p.ends_with("tokenizer.json")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
