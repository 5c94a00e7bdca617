//! Reading a diffusers JSON config key by key: each reader names the file and the key in its
//! error, so a value tilt cannot take is refused in one line (shared by the scheduler and model
//! readers).

use serde_json::{Map, Value};

use crate::{KernelError, Result};

/// An error naming the file and the key.
pub(crate) fn key_err(file: &str, key: &str, detail: impl Into<String>) -> KernelError {
    KernelError::model_config(file, key, detail)
}

/// The refusal of a key tilt does not implement.
pub(crate) fn unknown_key(file: &str, key: &str, v: &Value) -> KernelError {
    key_err(
        file,
        key,
        format!("= {v}: tilt does not implement this key"),
    )
}

/// The JSON object of a config file's text.
pub(crate) fn object(text: &str, file: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(key_err(file, "(file)", "expected a JSON object")),
        Err(e) => Err(key_err(file, "(file)", format!("not valid JSON: {e}"))),
    }
}

pub(crate) fn num(file: &str, key: &str, v: &Value) -> Result<f64> {
    v.as_f64()
        .filter(|x| x.is_finite())
        .ok_or_else(|| key_err(file, key, format!("expected a number, found {v}")))
}

pub(crate) fn uint(file: &str, key: &str, v: &Value) -> Result<usize> {
    v.as_u64().map(|x| x as usize).ok_or_else(|| {
        key_err(
            file,
            key,
            format!("expected a non-negative integer, found {v}"),
        )
    })
}

pub(crate) fn opt_uint(file: &str, key: &str, v: &Value) -> Result<Option<usize>> {
    if v.is_null() {
        Ok(None)
    } else {
        uint(file, key, v).map(Some)
    }
}

pub(crate) fn flag(file: &str, key: &str, v: &Value) -> Result<bool> {
    v.as_bool()
        .ok_or_else(|| key_err(file, key, format!("expected true or false, found {v}")))
}

pub(crate) fn text<'a>(file: &str, key: &str, v: &'a Value) -> Result<&'a str> {
    v.as_str()
        .ok_or_else(|| key_err(file, key, format!("expected a string, found {v}")))
}

pub(crate) fn list<'a>(file: &str, key: &str, v: &'a Value) -> Result<&'a Vec<Value>> {
    v.as_array()
        .ok_or_else(|| key_err(file, key, format!("expected a list, found {v}")))
}

/// `key` must hold one of `ok`: a feature tilt does not implement is refused unless it is off.
pub(crate) fn require(file: &str, key: &str, v: &Value, ok: &[Value], what: &str) -> Result<()> {
    if ok.contains(v) {
        Ok(())
    } else {
        Err(key_err(
            file,
            key,
            format!("= {v}: {what} is not supported"),
        ))
    }
}
