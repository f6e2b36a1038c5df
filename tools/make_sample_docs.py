#!/usr/bin/env python3
"""Generate the binary sample documents of the Mavuno Bora knowledge base.

Writes two files under knowledge/ (relative to the repository root):

* crops/coffee_quality_and_delivery_standards.pdf  (fpdf2, core Helvetica font, 4 pages)
* cooperative/bylaws_summary.docx                   (python-docx, Heading 1/2 styles, one table)

The text of both documents lives in this script so the binaries can be rebuilt at any time:

    python3 -m venv /tmp/kbvenv && /tmp/kbvenv/bin/pip install fpdf2 python-docx pypdf
    /tmp/kbvenv/bin/python tools/make_sample_docs.py

The PDF uses only latin-1 characters, because the built-in PDF core fonts cannot encode anything else.
Both generators set fixed metadata dates so that rebuilding gives stable content.
"""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXED_DATE = _dt.datetime(2026, 2, 1, 9, 0, 0, tzinfo=_dt.UTC)

# ---------------------------------------------------------------------------
# PDF: Coffee Quality and Delivery Standards (Kianjokoma Coffee Factory)
# Each page: (heading, [blocks]); a block is ("p", text), ("h", subheading) or ("ul", [items]).
# ---------------------------------------------------------------------------

PDF_TITLE = "Coffee Quality and Delivery Standards"
PDF_SUBTITLE = "Kianjokoma Coffee Factory - Mavuno Bora Farmers' Cooperative Society Ltd - Edition 2026"

PDF_PAGES = [
    (
        "1. Purpose and Picking Standards",
        [
            ("p", "Kenyan coffee is sold on quality. Two members can deliver the same kilograms of cherry and "
                  "receive very different prices, because the price of the factory's coffee at the auction "
                  "depends on how the cherry was picked, sorted and delivered. These standards apply to every "
                  "member who delivers cherry to the Kianjokoma Coffee Factory, the wet mill owned by the "
                  "Society. They were approved by the Management Committee and take effect for the 2026 early "
                  "crop. The field husbandry of coffee (varieties, pruning, fertilizer) is covered in the "
                  "handbook page on coffee husbandry; coffee berry disease has its own page."),
            ("h", "Pick only red-ripe cherry"),
            ("p", "Pick only fully ripe, red cherry. Green, yellow-green and half-ripe cherry gives light, "
                  "sour beans, and overripe or dry cherry gives a fermented, 'fruity-off' taste that can spoil "
                  "a whole lot of parchment. During the peak of the season, go over the trees every 10 to 14 "
                  "days so that cherry is picked at the right stage."),
            ("h", "Sort before you deliver"),
            ("ul", [
                "Pour the day's picking on a clean tarpaulin or sack in the shade, never on bare ground.",
                "Remove green, diseased, insect-damaged, overripe and dry cherries, and all leaves, twigs, "
                "stones and soil.",
                "Keep dry cherry (mbuni) in a separate bag; it is delivered separately on Saturdays.",
                "Carry cherry in clean sisal or woven bags or in buckets. Never use bags that held fertilizer, "
                "chemicals, paraffin or animal feed.",
            ]),
            ("h", "Deliver the same day"),
            ("p", "Cherry starts to ferment a few hours after picking. Deliver every picking on the same day. "
                  "Cherry picked on a previous day is not accepted as cherry; it can only be delivered as "
                  "mbuni once fully dried."),
            ("h", "Pickers"),
            ("p", "Pickers must have clean hands and must not smoke while picking. Children of school age may "
                  "not pick during school hours; the Society's buyers audit this rule every year."),
        ],
    ),
    (
        "2. Delivering Cherry at the Factory",
        [
            ("h", "Intake days and hours"),
            ("ul", [
                "Cherry intake: 1:00 pm to 6:00 pm, Monday to Saturday, during the main crop (October to "
                "January) and the early crop (April to June).",
                "No cherry intake on Sundays.",
                "Mbuni (dry cherry) intake: Saturdays, 8:00 am to 12:00 noon only.",
                "The factory announces the opening and closing dates of each season by SMS.",
            ]),
            ("h", "Intake procedure"),
            ("ul", [
                "Queue at the intake shed with your member card. Only the member or the nominee named on the "
                "card may deliver.",
                "The cherry clerk takes a sample of 100 cherries from your bags and counts the defective ones "
                "(unripe, overripe, dry, diseased or insect-damaged).",
                "If more than 5 cherries in the sample of 100 are defective, the delivery is returned to the "
                "member for re-sorting on the sorting tables next to the shed. It can be presented again the "
                "same afternoon.",
                "Accepted cherry is weighed on the certified factory scale in the member's presence and "
                "tipped into the receiving hopper.",
                "The weight is written on the member's cherry card and confirmed by SMS within one hour.",
            ]),
            ("h", "Weighing complaints"),
            ("p", "A member who doubts a weight may ask for the cherry to be re-weighed before it is tipped "
                  "into the hopper. Once the cherry has been tipped, the recorded weight is final. The factory "
                  "scales are certified each year by the county Weights and Measures office and the certificate "
                  "is displayed in the intake shed."),
            ("h", "Late and rejected deliveries"),
            ("p", "Cherry arriving after 6:00 pm is not received. Fermented, foul-smelling or wet cherry, and "
                  "cherry mixed with stones or soil, is rejected outright. A member whose deliveries are "
                  "returned three times in one season is visited by the factory manager and the zone field "
                  "officer for advice on picking and sorting."),
        ],
    ),
    (
        "3. Processing and Quality Control at the Factory",
        [
            ("p", "Good cherry can still lose its quality at the factory. The factory staff follow these steps "
                  "and members on the factory committee inspect them during the season."),
            ("h", "Pulping and fermentation"),
            ("ul", [
                "Pulping begins at 6:00 pm on every intake day, so that no cherry stays in the hopper "
                "overnight.",
                "The pulper separates heavy and light beans. Floating cherry and light beans are processed "
                "separately as lower grades.",
                "Parchment is fermented in tanks for 24 to 36 hours, until the mucilage washes off and the "
                "beans feel gritty between the fingers.",
            ]),
            ("h", "Washing, grading and soaking"),
            ("ul", [
                "Fermented parchment is washed in the grading channels with clean water and sorted into P1 "
                "(heaviest beans), P2, P3 and P-lights. Unpulped cherry (pods) is dried separately.",
                "Washed parchment is soaked under clean water for 12 to 24 hours, which improves the "
                "appearance and the cup.",
            ]),
            ("h", "Drying"),
            ("ul", [
                "Parchment is dried on raised drying tables, in a thin layer, turned often and covered during "
                "rain and in the hottest hours.",
                "Drying takes 10 to 14 days in good weather. Parchment is dry when its moisture is 10.5 to 11 "
                "percent, measured with the factory moisture meter.",
                "Dry parchment is stored in clean bags on pallets in the factory store until it is delivered "
                "to the miller.",
            ]),
            ("h", "Water and the environment"),
            ("p", "Waste water from pulping and fermentation is acidic and harms fish and downstream users. "
                  "All factory waste water goes into the soak pits and lagoons; no factory water may be "
                  "discharged into the Rupingazi River. Coffee pulp is composted for six months and sold back "
                  "to members as manure."),
        ],
    ),
    (
        "4. Marketing, Payment and Contacts",
        [
            ("h", "Marketing"),
            ("p", "Dry parchment is milled by a licensed commercial miller. The clean coffee is graded by bean "
                  "size and density (AA, AB, PB, C, E, T and others) and by cup quality, and is sold through "
                  "the Nairobi Coffee Exchange or by direct sales through a licensed marketing agent. Higher "
                  "grades and better cup scores earn higher prices, which is why the picking standards matter."),
            ("h", "Cherry advance"),
            ("p", "Members receive an advance of KES 30 per kg of cherry, paid by M-Pesa by the 15th of the "
                  "month after delivery. Coffee input credit and loan instalments are deducted from the "
                  "advance and from the final payment, within the one-third rule of the Society's payment "
                  "policy."),
            ("h", "Final payment"),
            ("p", "After all the coffee from a season has been sold, the factory's income less milling, "
                  "marketing and factory costs is shared among members in proportion to the kilograms of "
                  "cherry each delivered. For the 2024/2025 season the total pay-out was KES 88 per kg of "
                  "cherry (the KES 30 advance plus a final payment of KES 58, paid in August 2025). Factory "
                  "costs were 17 percent of gross sales. Mbuni is paid separately at its own rate; in "
                  "2024/2025 it was KES 45 per kg."),
            ("h", "Offences"),
            ("ul", [
                "Delivering cherry from another person's farm in your name, or delivering stolen cherry, leads "
                "to suspension and is reported to the police.",
                "Selling cherry to unlicensed cherry buyers (hawkers) while holding coffee input credit is "
                "side-selling and is punished under the Society's delivery rules.",
                "Deliberately wetting cherry to increase its weight leads to rejection of the whole delivery.",
            ]),
            ("h", "Contacts"),
            ("ul", [
                "Factory manager: Mr. Stephen Mwaniki Gichuki, 0712 907 336.",
                "Society helpline (payments and SMS receipts): 0709 400 500.",
                "Coffee field advice: your zone field officer or the agronomist, Mr. Daniel Gitonga Nyaga, "
                "0711 582 340.",
            ]),
        ],
    ),
]


def build_pdf(path: Path) -> None:
    from fpdf import FPDF

    class CoffeePDF(FPDF):
        def header(self) -> None:
            self.set_font("Helvetica", "I", 8)
            self.set_text_color(90, 90, 90)
            self.cell(0, 5, PDF_SUBTITLE, new_x="LMARGIN", new_y="NEXT", align="C")
            self.ln(2)
            self.set_text_color(0, 0, 0)

        def footer(self) -> None:
            self.set_y(-14)
            self.set_font("Helvetica", "I", 8)
            self.cell(0, 8, f"{PDF_TITLE} - page {self.page_no()} of {{nb}}", align="C")

    pdf = CoffeePDF(format="A4")
    pdf.set_title(PDF_TITLE)
    pdf.set_author("Mavuno Bora Farmers' Cooperative Society Ltd")
    pdf.set_subject("Kianjokoma Coffee Factory member standards")
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_auto_page_break(auto=True, margin=18)
    pdf.set_margins(18, 14, 18)

    for number, (heading, blocks) in enumerate(PDF_PAGES):
        pdf.add_page()
        if number == 0:
            pdf.set_font("Helvetica", "B", 18)
            pdf.multi_cell(0, 9, PDF_TITLE, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1)
        pdf.set_font("Helvetica", "B", 14)
        pdf.multi_cell(0, 8, heading, new_x="LMARGIN", new_y="NEXT")
        pdf.ln(1)
        for kind, content in blocks:
            if kind == "h":
                pdf.ln(1.5)
                pdf.set_font("Helvetica", "B", 11.5)
                pdf.multi_cell(0, 6, content, new_x="LMARGIN", new_y="NEXT")
            elif kind == "p":
                pdf.set_font("Helvetica", "", 10.5)
                pdf.multi_cell(0, 5.2, content, new_x="LMARGIN", new_y="NEXT")
                pdf.ln(1)
            elif kind == "ul":
                pdf.set_font("Helvetica", "", 10.5)
                for item in content:
                    pdf.set_x(pdf.l_margin + 3)
                    pdf.multi_cell(0, 5.2, "- " + item, new_x="LMARGIN", new_y="NEXT")
                pdf.ln(1)
            else:  # pragma: no cover - programming error
                raise ValueError(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    pdf.output(str(path))


# ---------------------------------------------------------------------------
# DOCX: By-laws (summary)
# Sections: ("h1", text) | ("h2", text) | ("p", text) | ("ul", [items]) | ("table", rows)
# ---------------------------------------------------------------------------

FEES_TABLE = [
    ("Item", "Amount", "Notes"),
    ("Entrance fee", "KES 1,000", "Paid once on joining; not refundable"),
    ("Value of one share", "KES 500", "Shares are not withdrawable in cash; they can be transferred"),
    ("Minimum shareholding", "20 shares (KES 10,000)", "To be fully paid within 24 months of joining"),
    ("Share contribution by deduction", "5% of each produce payment", "Until the minimum shareholding is reached"),
    ("Maximum shareholding", "One-fifth of total share capital", "No member may hold more"),
    ("Annual subscription", "KES 600", "Due by 31 July each year"),
    ("Share transfer fee", "KES 500", "Paid by the member receiving the shares"),
    ("Replacement member card", "KES 200", "Report a lost card to the office at once"),
]

DOCX_CONTENT = [
    ("title", "Mavuno Bora Farmers' Cooperative Society Ltd - By-laws (Summary)"),
    ("p", "This is a plain-language summary of the registered by-laws of the Society, prepared for members by "
          "the Honorary Secretary. Where this summary and the registered by-laws differ, the registered by-laws "
          "apply. A full copy can be read at the Society office in Kianjokoma during office hours."),

    ("h1", "Part A: The Society and its Members"),
    ("h2", "1. Name, registration and area"),
    ("p", "The Society is the Mavuno Bora Farmers' Cooperative Society Ltd, registered in 2009 under the "
          "Co-operative Societies Act with registration number CS/9127. Its registered office is at Mavuno Bora "
          "House, Kianjokoma Market, Embu County. Its area of operation is the four zones of Kianjokoma, "
          "Rukuriri, Kathanjuri and Karurumo. The financial year runs from 1 July to 30 June."),
    ("h2", "2. Objectives"),
    ("ul", [
        "To collect, process and market members' coffee, milk, grain and avocado at the best possible price.",
        "To supply members with quality farm inputs, including on credit.",
        "To provide extension services, training and demonstrations.",
        "To provide savings and credit services to members.",
        "To promote sound environmental practices in farming and processing.",
    ]),
    ("h2", "3. Who can become a member"),
    ("p", "Any person aged 18 years or above who farms within the area of operation may apply, provided they "
          "farm at least a quarter of an acre (0.25 acre) of crops or keep at least one dairy cow. Farmer "
          "groups and youth groups registered in the area may also join as group members with one vote."),
    ("h2", "4. How to apply"),
    ("ul", [
        "Fill in the membership application form at the office or with a zone field officer.",
        "Attach a copy of the national ID card, the KRA PIN certificate and one passport photo.",
        "Give an M-Pesa line registered in your own name; all payments will go to this line.",
        "Name at least one nominee on the nominee form.",
        "Pay the entrance fee through Paybill 408722 with your new member number followed by the letter F.",
    ]),
    ("p", "The Management Committee considers applications at its monthly meeting and informs the applicant "
          "within 30 days. A new member receives a member number (MB followed by five digits) and a member card."),
    ("h2", "5. Fees and shares"),
    ("p", "The fees and share requirements in force are shown in the table below."),
    ("table", FEES_TABLE),
    ("h2", "6. Rights of members"),
    ("ul", [
        "One member, one vote at general meetings, whatever the number of shares held.",
        "To deliver produce and receive payment according to the delivery rules.",
        "To receive interest on shares and a patronage bonus when approved by the AGM.",
        "To borrow and to take inputs on credit according to the credit policy.",
        "To inspect the by-laws, the register of members and the audited accounts at the office.",
        "To stand for election if qualified.",
    ]),
    ("h2", "7. Duties of members"),
    ("ul", [
        "To deliver produce to the Society and not to side-sell produce pledged against credit.",
        "To follow the produce delivery rules and quality standards.",
        "To pay shares, subscriptions and debts on time.",
        "To attend general meetings and take part in zone meetings.",
    ]),
    ("h2", "8. Active and dormant members"),
    ("p", "A member is active if they deliver produce to the Society at least twice in a financial year. A "
          "member who makes no delivery for two consecutive financial years becomes dormant. Dormant members "
          "cannot vote, stand for election or borrow until they become active again."),

    ("h1", "Part B: Meetings and Committees"),
    ("h2", "9. The Annual General Meeting"),
    ("ul", [
        "The AGM is held every year not later than 31 October. The 2026 AGM is set for Saturday 24 October "
        "2026 at Kianjokoma Primary School grounds.",
        "Written notice with the agenda is given at least 21 days before the meeting, on notice boards, by SMS "
        "and on the radio.",
        "The quorum is 150 members present in person.",
        "Motions from members must reach the Honorary Secretary in writing at least 30 days before the AGM.",
        "The AGM receives the audited accounts, approves the budget, decides on the distribution of surplus "
        "and elects committee members.",
    ]),
    ("h2", "10. Special General Meetings"),
    ("p", "The Management Committee may call a Special General Meeting at any time. It must call one within "
          "30 days when at least 200 members request it in writing, stating the business to be discussed."),
    ("h2", "11. The Management Committee"),
    ("ul", [
        "Nine members: two elected from each of the four zones and the chairperson, elected by all members "
        "at the AGM.",
        "Each term is three years; one-third of the members retire every year by rotation.",
        "No one may serve more than two consecutive terms.",
        "Candidates must be active members with their minimum shareholding fully paid and no debts in arrears.",
        "The Committee appoints a Loans Committee of three of its members, which meets on the second and "
        "fourth Thursday of every month.",
    ]),
    ("h2", "12. The Supervisory Committee"),
    ("p", "Three members elected at the AGM supervise the books, the stores and the work of the Management "
          "Committee on behalf of members, and hear complaints that members cannot resolve with the staff. No "
          "member of the Supervisory Committee may sit on the Management Committee."),
    ("h2", "13. Elections"),
    ("p", "Elections are by secret ballot at the AGM, supervised by the Sub-County Co-operative Officer. "
          "Zone representatives are elected by the members of that zone only."),

    ("h1", "Part C: Money, Discipline and Disputes"),
    ("h2", "14. Distribution of surplus"),
    ("ul", [
        "At least 20 percent of the net surplus each year goes to the statutory reserve fund.",
        "The AGM may approve interest on share capital. The 2025 AGM approved interest of 8 percent on "
        "shares, paid by 15 December 2025.",
        "The AGM may approve a patronage bonus shared in proportion to the value of each member's deliveries.",
    ]),
    ("h2", "15. Deposits"),
    ("p", "Once a member's minimum shareholding is complete, further payments made with the letter S are "
          "recorded as deposits. Deposits count towards the loan limit (three times shares and deposits) and "
          "can be refunded when the member leaves the Society, after debts are cleared."),
    ("h2", "16. Discipline"),
    ("p", "The following are disciplinary offences: adulterating milk; side-selling produce pledged against "
          "credit; delivering another person's or stolen produce; giving false information to obtain credit; "
          "and violence or misconduct at Society premises or meetings. Penalties are a written warning, a fine "
          "of up to KES 5,000, suspension of deliveries or credit, or expulsion. Expulsion requires a decision "
          "of a general meeting on the recommendation of the Management Committee. Every member has the "
          "right to be heard before a penalty is imposed."),
    ("h2", "17. Complaints and disputes"),
    ("p", "Complaints are handled in the following steps. A member may move to the next step if the complaint "
          "is not resolved in the time given."),
    ("ul", [
        "Step 1: Raise the matter with your zone field officer or zone committee member within 14 days of the "
        "event.",
        "Step 2: Write to the General Manager, who must reply in writing within 21 days.",
        "Step 3: Ask the Supervisory Committee for a hearing; it must hear the matter within 30 days.",
        "Step 4: Refer the dispute to the Co-operative Tribunal, with the advice of the Sub-County "
        "Co-operative Officer.",
    ]),
    ("p", "Disputes about a weight or a measure must be raised at the time of delivery, when the produce can "
          "be re-weighed in the presence of the member and the clerk."),
    ("h2", "18. Leaving the Society, death and nominees"),
    ("ul", [
        "A member may withdraw by giving three months' written notice.",
        "Shares are not refunded in cash on demand; they are transferred to another member or to the "
        "nominee. If no buyer is found, the Society refunds their value within 12 months, after deducting "
        "any debts.",
        "A member who has guaranteed a loan that is not yet repaid cannot withdraw.",
        "On the death of a member, shares, deposits and any payments due go to the nominee named on the "
        "nominee form.",
    ]),
    ("h2", "19. Amending the by-laws"),
    ("p", "The by-laws may be amended by a two-thirds majority of the members present and voting at a general "
          "meeting, after notice of the proposed amendment. An amendment takes effect when it is registered "
          "by the Commissioner for Co-operative Development."),
]


def build_docx(path: Path) -> None:
    import docx
    from docx.shared import Pt

    document = docx.Document()
    core = document.core_properties
    core.title = "Mavuno Bora Farmers' Cooperative Society Ltd - By-laws (Summary)"
    core.author = "Honorary Secretary, Mavuno Bora Farmers' Cooperative Society"
    core.created = FIXED_DATE.replace(tzinfo=None)
    core.modified = FIXED_DATE.replace(tzinfo=None)
    core.last_modified_by = "Mavuno Bora"
    document.styles["Normal"].font.size = Pt(11)

    for kind, content in DOCX_CONTENT:
        if kind == "title":
            document.add_heading(content, level=0)
        elif kind == "h1":
            document.add_heading(content, level=1)
        elif kind == "h2":
            document.add_heading(content, level=2)
        elif kind == "p":
            document.add_paragraph(content)
        elif kind == "ul":
            for item in content:
                document.add_paragraph(item, style="List Bullet")
        elif kind == "table":
            header, *rows = content
            table = document.add_table(rows=1, cols=len(header))
            table.style = "Table Grid"
            for cell, text in zip(table.rows[0].cells, header):
                cell.text = ""
                cell.paragraphs[0].add_run(text).bold = True
            for row in rows:
                cells = table.add_row().cells
                for cell, text in zip(cells, row):
                    cell.text = text
        else:  # pragma: no cover - programming error
            raise ValueError(kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    document.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--knowledge", type=Path, default=ROOT / "knowledge",
                        help="knowledge folder to write into (default: knowledge/ of this repository)")
    args = parser.parse_args()
    pdf_path = args.knowledge / "crops" / "coffee_quality_and_delivery_standards.pdf"
    docx_path = args.knowledge / "cooperative" / "bylaws_summary.docx"
    build_pdf(pdf_path)
    build_docx(docx_path)
    for p in (pdf_path, docx_path):
        print(f"wrote {p.relative_to(args.knowledge)} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
