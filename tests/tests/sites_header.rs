//! The site named in an assignment's header, on a server, through the agent's own applier
//! (`cm_agent::node::apply::Applier`, the bundled interpreter plugin, pinned manager key):
//!
//! - an assignment the manager signed for site `www` is refused by an agent that serves only
//!   `shop` (reported, never applied: `shop`'s root gets nothing), and applied by one that
//!   serves `www`;
//! - the site field changed on the way (a relay moving a run to another site) fails the
//!   manager's signature: the header is covered by the trailer the signature signs.

use std::fs;
use std::path::Path;

use cm_agent::node::apply::Applier;
use cm_agent::node::sites::{SiteSpec, site_of};
use cm_assignment::format::{HEADER_LEN, SITE_FIELD};
use cm_assignment::{AssignmentType, BuildOptions, build};
use cm_site::SiteConfig;
use cm_tests::{test_pins, test_signer};

fn signed_publish(staging: &Path, out: &Path, site: &str) {
    let mut opts = BuildOptions::new(AssignmentType::Publish, 1).for_site(site);
    opts.signer = Some(test_signer().clone());
    build(staging, None, out, &opts).unwrap();
}

fn applier(dir: &Path, sites: &[SiteSpec]) -> Applier {
    Applier::open(
        sites,
        &dir.join("plugins"),
        cm_plugin_host::bundled::INTERPRETER,
        &dir.join("state"),
        SiteConfig { signers: Some(test_pins()), ..SiteConfig::default() },
    )
    .unwrap()
}

fn releases(root: &Path) -> usize {
    fs::read_dir(root.join("releases")).map_or(0, |d| d.count())
}

#[test]
fn an_assignment_goes_only_to_the_site_its_signed_header_names() {
    let d = tempfile::tempdir().unwrap();
    let staging = d.path().join("staging");
    fs::create_dir_all(&staging).unwrap();
    fs::write(staging.join("index.html"), "www").unwrap();
    let for_www = d.path().join("www.assignment");
    signed_publish(&staging, &for_www, "www");
    assert_eq!(site_of(&for_www).unwrap(), "www");

    // An agent serving only shop: refused, reported, shop's root untouched.
    let shop_root = d.path().join("a/shop");
    let a = applier(&d.path().join("a"), &[SiteSpec::new("shop", &shop_root)]);
    let out = a.apply(1, &for_www);
    let why = out.error.as_deref().unwrap_or_default();
    assert!(
        why.contains(
            "the assignment is for site www, which this server does not serve (it serves shop)"
        ),
        "{out:?}"
    );
    assert_eq!(out.site, "www");
    assert_eq!(releases(&shop_root), 0);
    assert!(a.recent().iter().any(|r| r.run == 1 && r.error.is_some()), "shown in the status");

    // The same file on an agent serving www and shop: applied to www's root only.
    let (www_root, shop_root) = (d.path().join("b/www"), d.path().join("b/shop"));
    let b = applier(
        &d.path().join("b"),
        &[SiteSpec::new("www", &www_root), SiteSpec::new("shop", &shop_root)],
    );
    let out = b.apply(1, &for_www);
    assert_eq!(out.error, None, "{out:?}");
    assert_eq!((out.site.as_str(), releases(&www_root), releases(&shop_root)), ("www", 1, 0));

    // The site field rewritten to shop (length byte, name, zero padding — a well-formed
    // header): it now decodes as shop's, and the manager's signature no longer matches.
    let mut bytes = fs::read(&for_www).unwrap();
    let field = &mut bytes[HEADER_LEN - SITE_FIELD..HEADER_LEN];
    field.fill(0);
    field[0] = 4;
    field[1..5].copy_from_slice(b"shop");
    let moved = d.path().join("moved.assignment");
    fs::write(&moved, &bytes).unwrap();
    assert_eq!(site_of(&moved).unwrap(), "shop");
    let out = b.apply(2, &moved);
    let why = out.error.as_deref().unwrap_or_default();
    assert!(why.contains("trailer") || why.contains("signature"), "{out:?}");
    assert_eq!(releases(&shop_root), 0, "nothing of it reached shop's root");
}
