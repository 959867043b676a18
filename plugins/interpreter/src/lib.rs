//! The default content interpreter: every command carried out by the SDK's standard
//! `execute` (host-side copies, fresh inodes), every commit and rollback accepted.

struct Default;

impl cm_plugin_sdk::Interpreter for Default {}

cm_plugin_sdk::interpreter!(Default);
