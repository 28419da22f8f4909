//! HF-style Jinja chat templates, rendered as transformers' `apply_chat_template(tokenize=False)`
//! renders them: `trim_blocks` and `lstrip_blocks` on, no trailing newline kept, lenient
//! undefined values (like jinja2's default `Undefined`), loop controls, `raise_exception(msg)`,
//! `strftime_now(fmt)`, a `tojson` filter that writes what Python's
//! `json.dumps(x, ensure_ascii=False)` writes, and Python string/dict methods (`.strip()`,
//! `.items()`, …). `{% generation %}` blocks (transformers' assistant-mask extension) render
//! their body unchanged.

use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::quantized::gguf_file::Content;
use minijinja::value::Kwargs;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};

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
        env.add_function("strftime_now", |fmt: String| strftime(&fmt, now_utc()));
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, strip_generation_tags(source))
            .map_err(render_err)?;
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
    let Some(source) = meta_str(content, "tokenizer.chat_template")? else { return Ok(None) };
    let tokens = if content.metadata.contains_key("tokenizer.ggml.tokens") {
        gguf_tokens(content)?
    } else {
        Vec::new()
    };
    let name = |key: &str| -> Result<Option<String>> {
        Ok(meta_token_id(content, key, tokens.len())?.map(|id| tokens[id as usize].to_string()))
    };
    let bos = name("tokenizer.ggml.bos_token_id")?;
    let eos = name("tokenizer.ggml.eos_token_id")?;
    ChatTemplate::new(source, bos, eos).map(Some)
}

fn validate_messages(messages: &serde_json::Value) -> Result<()> {
    let list = messages
        .as_array()
        .ok_or_else(|| Error::input("messages must be a JSON array of {role, content} objects"))?;
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
    let json = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let fmt = PyJson { indent, item_sep, key_sep, sort_keys, ascii };
    let mut out = String::new();
    fmt.write(&json, 0, &mut out);
    Ok(out)
}

/// Python `json.dumps` formatting options.
struct PyJson {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ascii: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    fn string(&self, s: &str, out: &mut String) {
        let quoted = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string());
        if !self.ascii {
            out.push_str(&quoted);
            return;
        }
        for c in quoted.chars() {
            if (c as u32) < 0x7f {
                out.push(c);
            } else {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }

    fn write(&self, v: &serde_json::Value, level: usize, out: &mut String) {
        use serde_json::Value as J;
        match v {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Number(n) => match n.as_f64() {
                Some(f) if !n.is_i64() && !n.is_u64() => out.push_str(&py_float(f)),
                _ => out.push_str(&n.to_string()),
            },
            J::String(s) => self.string(s, out),
            J::Array(a) if a.is_empty() => out.push_str("[]"),
            J::Object(o) if o.is_empty() => out.push_str("{}"),
            J::Array(a) => {
                out.push('[');
                for (i, item) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            J::Object(o) => {
                let mut entries: Vec<_> = o.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.string(k, out);
                    out.push_str(&self.key_sep);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
        }
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
    if s.contains('.') { s } else { format!("{s}.0") }
}

/// (year, month 1-12, day 1-31, hour, minute, second, weekday 0=Sunday, day of year 1-366), UTC.
type Civil = (i64, u32, u32, u32, u32, u32, u32, u32);

fn now_utc() -> Civil {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    civil_from_unix(secs)
}

fn civil_from_unix(secs: i64) -> Civil {
    let days = secs.div_euclid(86400);
    let sod = secs.rem_euclid(86400) as u32;
    // Howard Hinnant's days -> civil date.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let d = (doy_mar - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    const CUM: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUM[(m - 1) as usize] + d + u32::from(leap && m > 2);
    let wday = (days + 4).rem_euclid(7) as u32;
    (y, m, d, sod / 3600, sod / 60 % 60, sod % 60, wday, yday)
}

/// C/Python `strftime` for the common directives (UTC; `%-d`-style unpadded forms too).
/// Unknown directives are copied through, as glibc does.
fn strftime(fmt: &str, t: Civil) -> String {
    const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    const MONTHS: [&str; 12] = [
        "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
        "November", "December",
    ];
    let (y, mo, d, h, mi, s, wd, yd) = t;
    let h12 = if h % 12 == 0 { 12 } else { h % 12 };
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut spec = chars.next();
        let pad = spec != Some('-');
        if !pad {
            spec = chars.next();
        }
        let num = |v: i64, w: usize| if pad { format!("{v:0w$}") } else { v.to_string() };
        let piece = match spec {
            Some('Y') => y.to_string(),
            Some('y') => num(y.rem_euclid(100), 2),
            Some('m') => num(mo.into(), 2),
            Some('d') => num(d.into(), 2),
            Some('e') => if pad { format!("{d:2}") } else { d.to_string() },
            Some('H') => num(h.into(), 2),
            Some('I') => num(h12.into(), 2),
            Some('M') => num(mi.into(), 2),
            Some('S') => num(s.into(), 2),
            Some('j') => num(yd.into(), 3),
            Some('w') => wd.to_string(),
            Some('p') => (if h < 12 { "AM" } else { "PM" }).to_string(),
            Some('a') => DAYS[wd as usize % 7][..3].to_string(),
            Some('A') => DAYS[wd as usize % 7].to_string(),
            Some('b') | Some('h') => MONTHS[(mo as usize + 11) % 12][..3].to_string(),
            Some('B') => MONTHS[(mo as usize + 11) % 12].to_string(),
            Some('F') => format!("{y}-{mo:02}-{d:02}"),
            Some('T') => format!("{h:02}:{mi:02}:{s:02}"),
            Some('R') => format!("{h:02}:{mi:02}"),
            Some('D') => format!("{mo:02}/{d:02}/{:02}", y.rem_euclid(100)),
            Some('Z') => "UTC".to_string(),
            Some('z') => "+0000".to_string(),
            Some('%') => "%".to_string(),
            Some(o) => format!("%{}{o}", if pad { "" } else { "-" }),
            None => format!("%{}", if pad { "" } else { "-" }),
        };
        out.push_str(&piece);
    }
    out
}
