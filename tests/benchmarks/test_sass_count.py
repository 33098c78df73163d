"""benchmarks/sass_count.py: the counts the kernel notes quote come from the right instructions (the
main loop is the longest backward branch; PRMT is told apart by what its selector does)."""
import pathlib

BENCHMARKS = pathlib.Path(__file__).parents[2] / "benchmarks"

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   PRMT R2, R3, 0x5410, R4 ;
        /*0020*/               @P0 BRA 0x60 ;
        /*0030*/                   HFMA2.BF16_V2 R5, R6, R7, R8 ;
        /*0040*/              @!P1 BRA 0x30 ;
        /*0050*/                   IMAD.MOV.U32 R9, RZ, RZ, R10 ;
        /*0060*/                   PRMT R11, R12, 0x4140, RZ ;
        /*0070*/                   LOP3.LUT R13, R14, 0xf000f, R15, 0xea, !PT ;
        /*0080*/                   PRMT R16, R17, 0x7632, R18 ;
        /*0090*/               @P2 BRA 0x50 ;
        /*00a0*/                   EXIT ;
"""


def test_counts_the_longest_loop_by_kind(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import sass_count

    counts = sass_count.count(SASS)
    assert counts["total"] == 11
    assert counts["loop"] == 5  # 0x50 .. 0x90, not the shorter 0x30 .. 0x40
    assert counts["loop_by_kind"] == {"IMAD.MOV": 1, "PRMT spread": 1, "LOP3": 1, "PRMT pack": 1, "BRA": 1}
