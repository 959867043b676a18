//! A hosted site on a server: releases, applying an assignment through the interpreter plugin into a new release, and atomic, crash-safe commit and rollback.
