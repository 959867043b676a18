//! The Content Control Manager: database, HTTP API, jobs, scheduler and store-and-forward tree distribution.
