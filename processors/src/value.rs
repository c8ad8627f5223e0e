//! [`same_value`]: when two JSON values count as the same (a rewrite, not a change).

use serde_json::Value;

/// Whether `a` and `b` are the same JSON value: serde_json's `==`, except that `0.0` and `-0.0`
/// differ (they compare equal as numbers but are different values to store and show, so a
/// write that turns one into the other is a change and is sent on).
pub fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y
                && match (x.is_f64(), x.as_f64(), y.as_f64()) {
                    (true, Some(p), Some(q)) => p.is_sign_negative() == q.is_sign_negative(),
                    _ => true,
                }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_value(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

/// [`same_value`] of two optional values (`None` is the same only as `None`).
pub fn same_opt(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => same_value(a, b),
        (a, b) => a.is_none() && b.is_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn zero_and_negative_zero_differ_everywhere_else_it_is_equality() {
        assert!(!same_value(&json!(0.0), &json!(-0.0)));
        assert!(!same_value(&json!([1, 0.0]), &json!([1, -0.0])));
        assert!(!same_value(
            &json!({"a": {"b": -0.0}}),
            &json!({"a": {"b": 0.0}})
        ));
        assert!(same_value(&json!(-0.0), &json!(-0.0)));
        assert!(same_value(&json!(2.5), &json!(2.5)));
        assert!(same_value(&json!({"a": [1, "x"]}), &json!({"a": [1, "x"]})));
        // As serde_json: an integer is not the float of the same number.
        assert!(!same_value(&json!(1), &json!(1.0)));
        assert!(same_value(&json!(0), &json!(0)));
        assert!(!same_value(&json!({"a": 1}), &json!({"a": 1, "b": 2})));
        assert!(same_opt(None, None));
        assert!(!same_opt(Some(&json!(0.0)), Some(&json!(-0.0))));
        assert!(!same_opt(Some(&json!(null)), None));
    }
}
