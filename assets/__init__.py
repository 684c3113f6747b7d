"""Files shipped with cirgen (installed as the package `cirgen_assets`)."""
